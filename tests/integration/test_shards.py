"""Sharded statistics across real worker processes, on both stacks: a statistic asked for
through ``compute_statistic`` is split, two ``palimpsest worker`` processes both compute
shards, and the merge equals the one-piece computation."""
import re
from pathlib import Path

import torch
from sqlalchemy import select

from rewriting.checkpoint import load_model
from rewriting.statistics import SecondMoment, compute_second_moment
from stack import wait_until
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Statistic, StatisticShard
from storage.statistics import insert_statistic, parse_sample_spec, sample_spec

ROOT = Path(__file__).resolve().parents[2]
DEMO_WEIGHTS = ROOT / "demo" / "weights" / "generator.safetensors"
LAYER = "layer4"
# The demo generator, so that a shard is real work (~0.4 s of one core each here): the worker
# that plans the shards cannot finish them all before the other worker's first poll.
SHARD = 512
SHARDS = 16


def computed_shards(process) -> set:
    """The shards a worker process computed, from its log (``workers.statistics``)."""
    return set(re.findall(r"computed (shd_\w+) over", process.log()))


def test_two_workers_compute_the_shards_of_one_statistic(stack, tmp_path):
    from workers.models import register_model_file

    stack.worker.stop()  # the fixture's worker has the default shard size: two with a small one instead
    stack.variables["PALIMPSEST_SHARD_SAMPLES"] = str(SHARD)
    workers = [stack.start_worker(), stack.start_worker()]

    session_factory = make_session_factory(make_engine(stack.settings.database_url))
    path = DEMO_WEIGHTS
    register_model_file(session_factory, stack.store(), path, name="demo")
    spec = sample_spec(SHARD * SHARDS)
    from rewriting.checkpoint import file_sha256

    sha = file_sha256(path)
    with session_scope(session_factory) as session:
        stat_id = insert_statistic(session, sha, LAYER, spec).id
    stack.celery().send_task("workers.statistics.compute_statistic", args=[stat_id])

    def ready():
        with session_scope(session_factory) as session:
            stat = session.get(Statistic, stat_id, populate_existing=True)
            return stat.status == "ready" and stat

    stat = wait_until(ready, timeout=180, interval=0.2, what="the sharded statistic ready")
    with session_scope(session_factory) as session:
        shards = session.scalars(select(StatisticShard).where(StatisticShard.statistic_id == stat_id)).all()
    assert stat.shard_count == SHARDS == len(shards)
    assert all(s.status == "ready" and s.fencing_token == 1 for s in shards)  # each computed once

    by_worker = [computed_shards(w) for w in workers]
    assert all(by_worker), f"each worker computed shards: {[len(b) for b in by_worker]}"
    assert not (by_worker[0] & by_worker[1])
    assert by_worker[0] | by_worker[1] == {s.id for s in shards}

    with stack.store().open(stat.object_key) as f:
        (tmp_path / "merged.safetensors").write_bytes(f.read())
    got = SecondMoment.load(tmp_path / "merged.safetensors")
    seeds = parse_sample_spec(spec)
    want = compute_second_moment(load_model(path), LAYER, f"{seeds.start}-{seeds.stop - 1}")
    assert got.count == want.count == SHARD * SHARDS * 64
    # other processes may split a float32 matmul differently, so equal to float32 rounding
    # here (tests/workers/test_shards.py shows float64 equality within one process)
    assert torch.allclose(got.moment, want.moment, rtol=1e-6, atol=1e-6 * want.moment.abs().max().item())
    assert (got.metadata["seeds"], got.metadata["sample_spec"]) == (f"{seeds.start}-{seeds.stop - 1}", spec)

