"""Sharded statistics through the real shard path (task bodies, database, store): the
split, the exact merge, one merger, a failed or lost shard recomputed alone, jobs on a
sharded statistic."""
import threading
import time
from datetime import timedelta

import pytest
import torch
from sqlalchemy import select, update

from job_fixtures import STAT_LAYER, database_url, make_world, tiny_model, world  # noqa: F401  (fixtures)
from rewriting.checkpoint import load_model
from rewriting.statistics import SecondMoment, compute_second_moment
from storage.db import session_scope
from storage.models import Model, Statistic, StatisticShard, utcnow
from storage.statistics import insert_statistic, parse_sample_spec, sample_spec
from workers.cache import WorkerCache
from workers.jobs import process_job
from workers.statistics import (
    SHARD_MULTIPLE,
    claim_merge,
    claim_statistic,
    next_step,
    plan_shards,
    process_shard,
    process_statistic,
    shard_ranges,
    shards_of,
)

SHARD = 64  # one batch a shard
SHARDS = 5
SPEC = sample_spec(SHARD * SHARDS)


@pytest.fixture
def sharded(database_url, tmp_path, world):  # noqa: F811
    """The world with small shards (a statistic over more than 64 images is split)."""
    return make_world(database_url, world.store, tmp_path, shard_samples=SHARD)


def model_sha(world, model_id):
    with session_scope(world.session_factory) as session:
        return session.get(Model, model_id).sha256


def new_statistic(world, sha, spec=SPEC):
    with session_scope(world.session_factory) as session:
        return insert_statistic(session, sha, STAT_LAYER, spec).id


def rows(world, stat_id):
    with session_scope(world.session_factory) as session:
        return session.get(Statistic, stat_id), shards_of(session, stat_id)


def plan(world, stat_id, shard_samples=SHARD):
    with session_scope(world.session_factory) as session:
        return [s.id for s in plan_shards(session, session.get(Statistic, stat_id), shard_samples)]


def stored_moment(world, key):
    path = world.tmp_path / f"{key.replace('/', '_')}"
    with world.store.open(key) as f, open(path, "wb") as out:
        out.write(f.read())
    return SecondMoment.load(path)


def one_shot(tiny_model, spec=SPEC):  # noqa: F811
    seeds = parse_sample_spec(spec)
    return compute_second_moment(load_model(tiny_model.path), STAT_LAYER, f"{seeds.start}-{seeds.stop - 1}")


def assert_float64_equal(got, want):
    """Equal up to float64 rounding: the same float32 batch products, only added in another order."""
    assert got.count == want.count
    assert torch.allclose(got.moment, want.moment, rtol=1e-12, atol=0)
    assert torch.allclose(got.sum, want.sum, rtol=1e-12, atol=1e-12 * want.sum.abs().max().item())


# --- the split ------------------------------------------------------------------------------

@pytest.mark.parametrize("samples, shard, sizes", [
    (320, 64, [64] * 5), (300, 64, [64, 64, 64, 64, 44]), (300, 100, [128, 128, 44]),
    (64, 64, [64]), (5000, 2048, [2048, 2048, 904]),
])
def test_shard_ranges_are_whole_batches_covering_the_seeds(samples, shard, sizes):
    seeds = range(100_000, 100_000 + samples)
    ranges = shard_ranges(seeds, shard)
    assert [len(r) for r in ranges] == sizes
    assert [s for r in ranges for s in r] == list(seeds)
    assert all(len(r) % SHARD_MULTIPLE == 0 for r in ranges[:-1])


def test_small_statistics_stay_whole(sharded, tiny_model):
    stat_id = new_statistic(sharded, model_sha(sharded, tiny_model.model_id), sample_spec(SHARD))
    assert plan(sharded, stat_id) == []
    assert process_statistic(sharded.session_factory, sharded.store, sharded.settings, stat_id) == "ready"
    stat, shards = rows(sharded, stat_id)
    assert (stat.shard_count, shards, stat.fencing_token) == (None, [], 1)


def test_concurrent_planners_agree_on_one_split(sharded):
    stat_id = new_statistic(sharded, "a" * 64)
    with session_scope(sharded.session_factory) as one, session_scope(sharded.session_factory) as two:
        stale = two.get(Statistic, stat_id)  # read before the first planner commits
        first = plan_shards(one, one.get(Statistic, stat_id), SHARD)
        one.commit()
        assert plan_shards(two, stale, 32) == []  # another size, too late: no second split
    stat, shards = rows(sharded, stat_id)
    assert len(first) == stat.shard_count == len(shards) == SHARDS
    assert [(s.number, s.seed_start, s.seed_stop) for s in shards] == [
        (i, 100_000 + SHARD * i, 100_000 + SHARD * (i + 1)) for i in range(SHARDS)]
    assert stat.status == "computing" and stat.lease_owner is None


# --- the exact merge, and exactly one merger ------------------------------------------------

def test_sharded_statistic_equals_the_one_shot_computation(sharded, tiny_model):  # noqa: F811
    sha = model_sha(sharded, tiny_model.model_id)
    stat_id = new_statistic(sharded, sha)
    sent = []
    assert process_statistic(sharded.session_factory, sharded.store, sharded.settings, stat_id,
                             send_shard=sent.append) == "ready"
    stat, shards = rows(sharded, stat_id)
    assert sorted(sent) == sorted(s.id for s in shards)  # every shard offered to the free workers
    assert stat.shard_count == SHARDS and all(s.status == "ready" and s.fencing_token == 1 for s in shards)
    assert len({s.sha256 for s in shards}) == SHARDS and all(s.object_key.startswith("shared/statistic_shards/")
                                                             for s in shards)
    got = stored_moment(sharded, stat.object_key)
    assert_float64_equal(got, one_shot(tiny_model))
    assert (got.metadata["seeds"], got.metadata["sample_spec"], got.metadata["model_sha256"]) == (
        "100000-100319", SPEC, sha)
    # each shard holds its own seeds' partial moment
    part = stored_moment(sharded, shards[2].object_key)
    assert_float64_equal(part, one_shot(tiny_model, "seeds:100128-100192"))


def test_shard_tasks_compute_alone_and_the_last_one_merges(sharded, tiny_model):  # noqa: F811
    stat_id = new_statistic(sharded, model_sha(sharded, tiny_model.model_id))
    shard_ids = plan(sharded, stat_id)
    run = lambda shard_id: process_shard(sharded.session_factory, sharded.store, sharded.settings,  # noqa: E731
                                         shard_id)
    assert [run(s) for s in shard_ids[:-1]] == ["computed"] * (SHARDS - 1)
    assert rows(sharded, stat_id)[0].status == "computing"
    assert run(shard_ids[-1]) == "merged"
    stat, shards = rows(sharded, stat_id)
    assert (stat.status, stat.fencing_token) == ("ready", 1)  # one merge lease, ever
    assert_float64_equal(stored_moment(sharded, stat.object_key), one_shot(tiny_model))
    # a second delivery of any shard task does nothing
    assert run(shard_ids[0]) is None and run(shard_ids[-1]) is None
    assert [s.fencing_token for s in rows(sharded, stat_id)[1]] == [1] * SHARDS


def test_exactly_one_worker_merges(sharded, tiny_model):  # noqa: F811
    stat_id = new_statistic(sharded, model_sha(sharded, tiny_model.model_id))
    shard_ids = plan(sharded, stat_id)
    with session_scope(sharded.session_factory) as session:  # every shard done, nobody merged yet
        session.execute(update(StatisticShard).where(StatisticShard.id.in_(shard_ids))
                        .values(status="ready", sha256="0" * 64, object_key="x"))
    # two workers saw the last shard finish at once, each with the same view of the row
    with session_scope(sharded.session_factory) as one, session_scope(sharded.session_factory) as two:
        seen_one, seen_two = one.get(Statistic, stat_id), two.get(Statistic, stat_id)
        first = claim_merge(one, seen_one, "w1", 30)
        one.commit()
        second = claim_merge(two, seen_two, "w2", 30)
    assert (first, second) == (1, None)
    assert rows(sharded, stat_id)[0].lease_owner == "w1"


# --- failed and lost shards are recomputed alone ---------------------------------------------

@pytest.fixture
def computations(monkeypatch):
    """Count the engine's statistic computations per seed range; ``fail`` makes one raise once."""
    import rewriting.statistics as engine

    real = engine.compute_second_moment
    state = {"calls": [], "fail": set()}

    def counted(model, layer, seeds, *args, **kwargs):
        state["calls"].append(seeds)
        if seeds in state["fail"]:
            state["fail"].discard(seeds)
            raise RuntimeError(f"the device fell over computing {seeds}")
        return real(model, layer, seeds, *args, **kwargs)

    monkeypatch.setattr(engine, "compute_second_moment", counted)
    return state


def test_failed_shard_is_recomputed_alone(sharded, tiny_model, computations):  # noqa: F811
    stat_id = new_statistic(sharded, model_sha(sharded, tiny_model.model_id))
    shard_ids = plan(sharded, stat_id)
    computations["fail"].add("100128-100191")  # shard 2, first attempt
    for shard_id in shard_ids[:2] + shard_ids[3:]:
        process_shard(sharded.session_factory, sharded.store, sharded.settings, shard_id)
    with pytest.raises(RuntimeError, match="fell over"):
        process_shard(sharded.session_factory, sharded.store, sharded.settings, shard_ids[2])
    stat, shards = rows(sharded, stat_id)
    assert (shards[2].status, shards[2].lease_owner) == ("failed", None) and "fell over" in shards[2].error
    assert stat.status == "failed" and shard_ids[2] in stat.error
    done = {s.id: (s.sha256, s.fencing_token) for s in shards if s.status == "ready"}
    assert len(done) == SHARDS - 1

    # the next worker that needs the statistic recomputes shard 2 only, then merges
    computations["calls"].clear()
    assert process_statistic(sharded.session_factory, sharded.store, sharded.settings, stat_id) == "ready"
    assert computations["calls"] == ["100128-100191"]
    stat, shards = rows(sharded, stat_id)
    assert {s.id: (s.sha256, s.fencing_token) for s in shards if s.id in done} == done  # untouched
    assert (shards[2].status, shards[2].fencing_token, shards[2].attempts, shards[2].error) == ("ready", 2, 2, None)
    assert (stat.status, stat.error) == ("ready", None)
    assert_float64_equal(stored_moment(sharded, stat.object_key), one_shot(tiny_model))


def test_lost_shards_are_taken_over_and_sent_again(sharded, tiny_model, computations):  # noqa: F811
    stat_id = new_statistic(sharded, model_sha(sharded, tiny_model.model_id))
    shard_ids = plan(sharded, stat_id)
    for shard_id in shard_ids[2:]:
        process_shard(sharded.session_factory, sharded.store, sharded.settings, shard_id)
    # shards 0 and 1 were taken by a worker that died: their leases lapse
    with session_scope(sharded.session_factory) as session:
        for shard in shards_of(session, stat_id)[:2]:
            assert claim_statistic(session, shard, "dead:1", ttl=0.01) == 1
    time.sleep(0.05)
    computations["calls"].clear()
    sent = []
    assert process_statistic(sharded.session_factory, sharded.store, sharded.settings, stat_id,
                             send_shard=sent.append) == "ready"
    # this worker took one lost shard over and offered the other to the free workers, then
    # (nobody else being there) computed it too; the three done shards were not recomputed
    assert sent == [shard_ids[1]]
    assert sorted(computations["calls"]) == ["100000-100063", "100064-100127"]
    stat, shards = rows(sharded, stat_id)
    assert [s.fencing_token for s in shards] == [2, 2, 1, 1, 1]
    assert_float64_equal(stored_moment(sharded, stat.object_key), one_shot(tiny_model))


def test_a_shard_task_whose_shard_is_held_computes_the_next_open_one(sharded, tiny_model):  # noqa: F811
    stat_id = new_statistic(sharded, model_sha(sharded, tiny_model.model_id))
    shard_ids = plan(sharded, stat_id)
    with session_scope(sharded.session_factory) as session:  # the planner took shard 0
        claim_statistic(session, session.get(StatisticShard, shard_ids[0]), "alive:1", ttl=60)
    run = lambda shard_id: process_shard(sharded.session_factory, sharded.store, sharded.settings,  # noqa: E731
                                         shard_id)
    assert run(shard_ids[0]) == "computed"  # shard 0 is left alone; shard 1 computed instead
    shards = rows(sharded, stat_id)[1]
    assert [(s.status, s.lease_owner) for s in shards[:3]] == [
        ("computing", "alive:1"), ("ready", None), ("pending", None)]
    assert run(shard_ids[1]) == "computed" and rows(sharded, stat_id)[1][2].status == "ready"
    for shard_id in shard_ids[3:]:
        run(shard_id)
    assert run(shard_ids[0]) is None  # every open shard held: nothing to do
    with session_scope(sharded.session_factory) as session:
        step = next_step(session, session.get(Statistic, stat_id), "me:1", 30)
        assert (step.action, step.done, step.total) == ("wait", SHARD * (SHARDS - 1), SHARD * SHARDS)


def test_shard_of_an_unknown_checkpoint_fails_and_says_why(sharded):
    from workers.statistics import StatisticUnavailable

    stat_id = new_statistic(sharded, "c" * 64)
    shard_ids = plan(sharded, stat_id)
    with pytest.raises(StatisticUnavailable):
        process_shard(sharded.session_factory, sharded.store, sharded.settings, shard_ids[0])
    stat, shards = rows(sharded, stat_id)
    assert shards[0].status == "failed" and "no ready model" in shards[0].error
    assert stat.status == "failed"


def test_cancelled_shard_goes_back_to_pending(sharded, tiny_model):  # noqa: F811
    from storage import lifecycle
    from storage.models import Job

    sha = model_sha(sharded, tiny_model.model_id)
    world = make_world(sharded.settings.database_url, sharded.store, sharded.tmp_path, shard_samples=64 * 2000)
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id, params={"steps": 20, "samples": 64 * 4000,
                                                                           "held_out": 2})
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        status=process_job(world.session_factory, world.store, world.settings, job_id)))
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with session_scope(world.session_factory) as session:
            job = session.get(Job, job_id)
            if job.phase == "statistics" and (job.progress_step or 0) > 0:
                break
        time.sleep(0.05)
    with session_scope(world.session_factory) as session:
        lifecycle.request_cancel(session, job_id)
    thread.join(timeout=30)
    assert result == {"status": "cancelled"}
    with session_scope(world.session_factory) as session:
        stat = session.scalars(select(Statistic).where(Statistic.model_sha256 == sha)).one()
        shards = shards_of(session, stat.id)
    # the shard being computed is released (a shard finished before is kept), none is held
    assert stat.shard_count == 2 and stat.status == "pending"
    assert shards[-1].status == "pending" and all(s.status in ("pending", "ready") for s in shards)
    assert all(s.lease_owner is None for s in shards)
    # the shard it was computing keeps its moment so far, for the next claim
    assert [s.status for s in shards if s.resume_object_key is not None] == ["pending"]


# --- jobs on a sharded statistic ------------------------------------------------------------

def test_jobs_share_one_sharded_statistic(sharded, tiny_model):  # noqa: F811
    params = {"steps": 20, "samples": SHARD * SHARDS, "held_out": 2}
    warm = WorkerCache(models=2, statistics=2)
    first = sharded.job(tiny_model.tenant_id, tiny_model.model_id, params=params)
    second = sharded.job(tiny_model.tenant_id, tiny_model.model_id, params=params)
    for job_id in (first, second):
        assert process_job(sharded.session_factory, sharded.store, sharded.settings, job_id, warm=warm) == "succeeded"
    sha = model_sha(sharded, tiny_model.model_id)
    with session_scope(sharded.session_factory) as session:
        stat = session.scalars(select(Statistic).where(Statistic.model_sha256 == sha)).one()
        shards = shards_of(session, stat.id)
    assert (stat.status, stat.shard_count, stat.count) == ("ready", SHARDS, SHARD * SHARDS * 64)
    assert [s.fencing_token for s in shards] == [1] * SHARDS and stat.fencing_token == 1  # none computed twice
    assert warm.statistics.loads == 0 and len(warm.statistics) == 1  # kept from the merge, never read back


def test_a_job_waits_while_another_worker_holds_the_last_shard(sharded, tiny_model):  # noqa: F811
    """Jobs waiting on a sharded statistic keep waiting, and pick up the merge."""
    stat_id = new_statistic(sharded, model_sha(sharded, tiny_model.model_id))
    shard_ids = plan(sharded, stat_id)
    for shard_id in shard_ids[1:]:
        process_shard(sharded.session_factory, sharded.store, sharded.settings, shard_id)
    with session_scope(sharded.session_factory) as session:
        shard = session.get(StatisticShard, shard_ids[0])
        token = claim_statistic(session, shard, "elsewhere:1", ttl=60)
    job_id = sharded.job(tiny_model.tenant_id, tiny_model.model_id,
                         params={"steps": 20, "samples": SHARD * SHARDS, "held_out": 2})
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        status=process_job(sharded.session_factory, sharded.store, sharded.settings, job_id)))
    thread.start()
    time.sleep(2)
    assert thread.is_alive() and rows(sharded, stat_id)[0].status == "computing"

    # the other worker finishes its shard (as compute_shard would): the waiting job merges
    from workers.statistics import complete_statistic
    from workers.artifacts import put_file

    seeds = range(shard.seed_start, shard.seed_stop)
    part = compute_second_moment(load_model(tiny_model.path), STAT_LAYER, f"{seeds.start}-{seeds.stop - 1}")
    part.save(sharded.tmp_path / "part.safetensors")
    stored = put_file(sharded.session_factory, sharded.store, sharded.tmp_path / "part.safetensors", None,
                      "statistic_shards", "p.safetensors")
    with session_scope(sharded.session_factory) as session:
        assert complete_statistic(session, shard_ids[0], token, stored, part.count)
    thread.join(timeout=60)
    assert result == {"status": "succeeded"}
    stat, shards = rows(sharded, stat_id)
    assert stat.status == "ready" and [s.fencing_token for s in shards] == [1] * SHARDS
    assert_float64_equal(stored_moment(sharded, stat.object_key), one_shot(tiny_model))


def test_expired_merge_is_redone(sharded, tiny_model):  # noqa: F811
    """A merger that died: once its lease lapses, the next worker merges."""
    stat_id = new_statistic(sharded, model_sha(sharded, tiny_model.model_id))
    shard_ids = plan(sharded, stat_id)
    run = lambda shard_id: process_shard(sharded.session_factory, sharded.store, sharded.settings,  # noqa: E731
                                         shard_id)
    assert [run(s) for s in shard_ids[:-1]] == ["computed"] * (SHARDS - 1)
    with session_scope(sharded.session_factory) as session:  # a merger took the lease, then died
        assert claim_statistic(session, session.get(Statistic, stat_id), "dead:1", ttl=1) == 1
    assert run(shard_ids[-1]) == "computed"  # the last shard: the merge lease is (still) held
    time.sleep(1.1)
    assert process_statistic(sharded.session_factory, sharded.store, sharded.settings, stat_id) == "ready"
    stat, shards = rows(sharded, stat_id)
    assert (stat.status, stat.fencing_token, stat.lease_owner) == ("ready", 2, None)
    assert [s.fencing_token for s in shards] == [1] * SHARDS
    assert_float64_equal(stored_moment(sharded, stat.object_key), one_shot(tiny_model))
