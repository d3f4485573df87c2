"""Shared statistics: sample specs, the row's insert-if-absent and lease, waiting on a
computation held elsewhere, taking over a dead one, and compute_statistic's body."""
import secrets
import threading
import time
from datetime import timedelta

import pytest
import torch
from sqlalchemy import select

from job_fixtures import LAYER, STAT_LAYER, SAMPLES, database_url, fast_params, make_world, \
    tiny_model, world  # noqa: F401  (fixtures)
from rewriting.checkpoint import load_model
from rewriting.statistics import SecondMoment, compute_second_moment
from storage import lifecycle
from storage.db import session_scope
from storage.models import Job, Statistic, utcnow
from storage.objects import StoredObject
from workers.artifacts import put_file
from workers.jobs import process_job
from storage.statistics import MAX_STAT_SAMPLES, insert_statistic, parse_sample_spec, sample_spec
from workers.statistics import StatisticUnavailable, claim_statistic, complete_statistic, process_statistic

SPEC = sample_spec(SAMPLES)


@pytest.mark.parametrize("samples, spec", [(1, "seeds:100000-100001"), (5000, "seeds:100000-105000"),
                                           (MAX_STAT_SAMPLES, "seeds:100000-1000000")])
def test_sample_spec(samples, spec):
    assert sample_spec(samples) == spec
    assert parse_sample_spec(spec) == range(100_000, 100_000 + samples)


def test_statistic_seeds_stay_below_the_held_out_seeds():
    from rewriting.metrics import held_out_seeds

    assert parse_sample_spec(sample_spec(MAX_STAT_SAMPLES)).stop <= held_out_seeds(None, 1)[0]


@pytest.mark.parametrize("samples", [0, -1, MAX_STAT_SAMPLES + 1, 1.5, True, "10"])
def test_sample_spec_refuses(samples):
    with pytest.raises(ValueError, match="samples"):
        sample_spec(samples)


@pytest.mark.parametrize("spec", ["seeds:5-5", "seeds:7-3", "0-100", "seeds:0-100,200", "seeds: 0-1", None])
def test_parse_sample_spec_refuses(spec):
    with pytest.raises(ValueError, match="sample spec"):
        parse_sample_spec(spec)


def fake_sha256() -> str:
    """A model sha256 no other test uses (the PostgreSQL database is shared by the session)."""
    return secrets.token_hex(32)


def test_insert_statistic_converges_on_one_row(world):
    sha = fake_sha256()
    with session_scope(world.session_factory) as one, session_scope(world.session_factory) as two:
        first = insert_statistic(one, sha, LAYER, SPEC)
        one.commit()
        second = insert_statistic(two, sha, LAYER, SPEC)
    assert first.id == second.id and second.status == "pending"
    with session_scope(world.session_factory) as session:
        assert len(session.scalars(select(Statistic).where(Statistic.model_sha256 == sha)).all()) == 1


def test_statistic_lease_is_exclusive_until_it_expires(world):
    with session_scope(world.session_factory) as session:
        stat = insert_statistic(session, fake_sha256(), LAYER, SPEC)
        now = utcnow()
        token = claim_statistic(session, stat, "first", ttl=30, now=now)
        assert token == 1
        session.refresh(stat)
        assert claim_statistic(session, stat, "second", ttl=30, now=now + timedelta(seconds=10)) is None
        assert claim_statistic(session, stat, "second", ttl=30, now=now + timedelta(seconds=31)) == 2
        # the first holder's writes name token 1: they no longer land
        stored = StoredObject("shared/statistics/x", "d" * 64, 1)
        assert not complete_statistic(session, stat.id, 1, stored, 0)
        session.refresh(stat)
        assert (stat.lease_owner, stat.fencing_token, stat.status) == ("second", 2, "computing")


def job_row(world, job_id):
    with session_scope(world.session_factory) as session:
        return session.get(Job, job_id)


def statistic_row(world, model_sha256):
    with session_scope(world.session_factory) as session:
        return session.scalars(select(Statistic).where(Statistic.model_sha256 == model_sha256)).one()


def model_sha(world, model_id):
    from storage.models import Model

    with session_scope(world.session_factory) as session:
        return session.get(Model, model_id).sha256


def run_in_thread(world, job_id):
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        status=process_job(world.session_factory, world.store, world.settings, job_id)))
    thread.start()
    return thread, result


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def hold_statistic_elsewhere(world, model_sha256, ttl=60.0):
    """Another worker's live lease on the statistic: (row, token)."""
    with session_scope(world.session_factory) as session:
        stat = insert_statistic(session, model_sha256, STAT_LAYER, SPEC)
        token = claim_statistic(session, stat, "elsewhere:1", ttl=ttl)
    return stat, token


def test_job_waits_for_a_statistic_computed_elsewhere(database_url, tmp_path, tiny_model, world):
    # a short job lease: waiting longer than it proves the heartbeat keeps it alive
    world = make_world(database_url, world.store, tmp_path, job_lease_seconds=2)
    sha = model_sha(world, tiny_model.model_id)
    stat, token = hold_statistic_elsewhere(world, sha)
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id)
    thread, result = run_in_thread(world, job_id)
    wait_for(lambda: job_row(world, job_id).phase == "statistics")
    time.sleep(3)  # > the job's lease: still running, still waiting, nothing recomputed
    job = job_row(world, job_id)
    assert (job.status, job.phase, job.attempts) == ("running", "statistics", 1)
    assert job.lease_expires_at > utcnow()
    assert (statistic_row(world, sha).fencing_token, statistic_row(world, sha).status) == (1, "computing")

    # the other worker finishes: the waiting job picks its result up
    moment = compute_second_moment(load_model(tiny_model.path), STAT_LAYER, f"100000-{100000 + SAMPLES - 1}",
                                   model_sha256=sha)
    moment.save(tmp_path / "moment.safetensors")
    stored = put_file(world.session_factory, world.store, tmp_path / "moment.safetensors", None, "statistics",
                      "second_moment.safetensors")
    with session_scope(world.session_factory) as session:
        assert complete_statistic(session, stat.id, token, stored, moment.count)
    thread.join(timeout=60)
    assert result == {"status": "succeeded"}
    assert job_row(world, job_id).metrics["statistic"]["id"] == stat.id
    assert statistic_row(world, sha).fencing_token == 1


def test_dead_computation_is_taken_over(world, tiny_model):
    sha = model_sha(world, tiny_model.model_id)
    hold_statistic_elsewhere(world, sha, ttl=0.01)  # that worker died: its lease lapses at once
    time.sleep(0.05)
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id)
    assert process_job(world.session_factory, world.store, world.settings, job_id) == "succeeded"
    stat = statistic_row(world, sha)
    assert (stat.status, stat.fencing_token, stat.lease_owner) == ("ready", 2, None)


def test_cancel_while_waiting_for_a_statistic(world, tiny_model):
    sha = model_sha(world, tiny_model.model_id)
    hold_statistic_elsewhere(world, sha)
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id)
    thread, result = run_in_thread(world, job_id)
    wait_for(lambda: job_row(world, job_id).phase == "statistics")
    with session_scope(world.session_factory) as session:
        lifecycle.request_cancel(session, job_id)
    cancelled_at = time.monotonic()
    thread.join(timeout=30)
    assert result == {"status": "cancelled"} and time.monotonic() - cancelled_at < 5
    stat = statistic_row(world, sha)
    assert (stat.status, stat.lease_owner, stat.fencing_token) == ("computing", "elsewhere:1", 1)  # not ours to touch


def test_cancel_while_computing_releases_the_statistic(world, tiny_model):
    sha = model_sha(world, tiny_model.model_id)
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id, params=fast_params(samples=MAX_STAT_SAMPLES))
    thread, result = run_in_thread(world, job_id)
    wait_for(lambda: (job := job_row(world, job_id)).phase == "statistics" and (job.progress_step or 0) > 0)
    with session_scope(world.session_factory) as session:
        lifecycle.request_cancel(session, job_id)
    thread.join(timeout=30)
    assert result == {"status": "cancelled"}
    stat = statistic_row(world, sha)
    # pending again, unowned: the next job that needs it computes it
    assert (stat.status, stat.lease_owner, stat.object_key) == ("pending", None, None)


def test_compute_statistic_body_computes_once_and_matches_the_engine(world, tiny_model):
    sha = model_sha(world, tiny_model.model_id)
    with session_scope(world.session_factory) as session:
        stat_id = insert_statistic(session, sha, STAT_LAYER, SPEC).id
    settings = world.settings
    assert process_statistic(world.session_factory, world.store, settings, stat_id) == "ready"
    assert process_statistic(world.session_factory, world.store, settings, stat_id) == "ready"  # second delivery
    stat = statistic_row(world, sha)
    assert (stat.fencing_token, stat.count, stat.lease_owner) == (1, SAMPLES * 64, None)
    with world.store.open(stat.object_key) as f, open(world.tmp_path / "got.safetensors", "wb") as out:
        out.write(f.read())
    got = SecondMoment.load(world.tmp_path / "got.safetensors")
    want = compute_second_moment(load_model(tiny_model.path), LAYER, f"100000-{100000 + SAMPLES - 1}")
    assert got.count == want.count
    assert torch.allclose(got.matrix, want.matrix, rtol=1e-6, atol=1e-9)
    assert (got.metadata["model_sha256"], got.metadata["sample_spec"]) == (sha, SPEC)

    # a job afterwards reuses it
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id)
    assert process_job(world.session_factory, world.store, settings, job_id) == "succeeded"
    assert statistic_row(world, sha).fencing_token == 1


def test_compute_statistic_of_an_unknown_checkpoint_fails(world):
    sha = fake_sha256()
    with session_scope(world.session_factory) as session:
        stat_id = insert_statistic(session, sha, STAT_LAYER, SPEC).id
    with pytest.raises(StatisticUnavailable):
        process_statistic(world.session_factory, world.store, world.settings, stat_id)
    stat = statistic_row(world, sha)
    assert stat.status == "failed" and "no ready model" in stat.error


def test_compute_statistic_of_an_unknown_layer_fails_and_records_why(world, tiny_model):
    from rewriting.errors import UnknownLayer

    sha = model_sha(world, tiny_model.model_id)
    with session_scope(world.session_factory) as session:
        stat_id = insert_statistic(session, sha, "layer99", SPEC).id
    with pytest.raises(UnknownLayer):
        process_statistic(world.session_factory, world.store, world.settings, stat_id)
    with session_scope(world.session_factory) as session:
        stat = session.get(Statistic, stat_id)
    assert (stat.status, stat.lease_owner) == ("failed", None) and "layer99" in stat.error


def test_process_statistic_of_a_missing_row_does_nothing(world):
    assert process_statistic(world.session_factory, world.store, world.settings, "sts_missing") is None


@pytest.mark.parametrize("shards", [1, 2])
def test_a_handed_back_statistic_goes_on_from_its_last_batch(database_url, tmp_path, tiny_model, world, shards):
    from storage.models import DeletedObject, StatisticShard
    from workers.heartbeat import ShutdownNotice
    from workers.statistics import HANDED_BACK

    samples = 64 * 3000  # a few seconds of batches on the tiny model
    # a short lease: the heartbeat polls the shutdown notice every 2/3 s
    world = make_world(database_url, world.store, tmp_path, job_lease_seconds=2, worker_shutdown_grace_seconds=0,
                       shard_samples=samples // shards)
    sha = model_sha(world, tiny_model.model_id)
    spec = sample_spec(samples)
    with session_scope(world.session_factory) as session:
        stat_id = insert_statistic(session, sha, STAT_LAYER, spec).id
    notice, result = ShutdownNotice(), {}
    thread = threading.Thread(target=lambda: result.update(status=process_statistic(
        world.session_factory, world.store, world.settings, stat_id, shutdown=notice)))
    thread.start()
    wait_for(lambda: statistic_row(world, sha).status == "computing")
    notice.announce()  # the worker is stopping: hand back at the next poll
    thread.join(timeout=60)
    assert result == {"status": HANDED_BACK}
    with session_scope(world.session_factory) as session:  # the piece it computed: the statistic, or shard 0
        table, mine = (Statistic, Statistic.id) if shards == 1 else (StatisticShard, StatisticShard.statistic_id)
        stopped = session.scalars(select(table).where(mine == stat_id, table.resume_object_key.is_not(None))).one()
    assert (stopped.status, stopped.lease_owner, stopped.object_key) == ("pending", None, None)
    with world.store.open(stopped.resume_object_key) as f, open(world.tmp_path / "partial.safetensors", "wb") as out:
        out.write(f.read())
    partial = SecondMoment.load(world.tmp_path / "partial.safetensors")
    seeds = parse_sample_spec(spec)
    first, last = (int(s) for s in partial.metadata["seeds"].split("-"))
    assert first == seeds.start and seeds.start < last + 1 < seeds.start + samples // shards  # part-way
    assert (last + 1 - first) % 64 == 0  # between batches

    # the next delivery goes on from there, and ends where an uninterrupted computation does
    assert process_statistic(world.session_factory, world.store, world.settings, stat_id) == "ready"
    stat = statistic_row(world, sha)
    with session_scope(world.session_factory) as session:
        assert session.get(table, stopped.id).resume_object_key is None
        assert session.get(DeletedObject, stopped.resume_object_key) is not None  # for the sweep
    with world.store.open(stat.object_key) as f, open(world.tmp_path / "got.safetensors", "wb") as out:
        out.write(f.read())
    got = SecondMoment.load(world.tmp_path / "got.safetensors")
    want = compute_second_moment(load_model(tiny_model.path), STAT_LAYER, f"{seeds.start}-{seeds.stop - 1}",
                                 model_sha256=sha)
    assert got.count == want.count
    if shards == 1:  # the same batches added in the same order
        assert torch.equal(got.moment, want.moment) and torch.equal(got.sum, want.sum)
    else:  # the shards' sums are added in another order
        assert torch.allclose(got.moment, want.moment, rtol=1e-12, atol=0)


def test_a_saved_moment_that_cannot_be_read_is_counted_again_from_the_first_seed(world, tiny_model):
    from workers.artifacts import put_bytes

    sha = model_sha(world, tiny_model.model_id)
    stored = put_bytes(world.session_factory, world.store, b"not a moment", None, "statistic_resume", "m")
    with session_scope(world.session_factory) as session:
        stat = insert_statistic(session, sha, STAT_LAYER, SPEC)
        stat.resume_object_key, stat.resume_sha256 = stored.key, stored.sha256
        stat_id = stat.id
    assert process_statistic(world.session_factory, world.store, world.settings, stat_id) == "ready"
    stat = statistic_row(world, sha)
    assert (stat.count, stat.resume_object_key) == (SAMPLES * 64, None)
