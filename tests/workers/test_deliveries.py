"""Tasks that kill their worker, or fail for good, end their row instead of coming back
forever (workers/deliveries.py): inspect_model, compute_statistic, compute_shard and
merge_batch, called as task bodies against SQLite and PostgreSQL. A worker that died in a
delivery leaves what it leaves in the database: its delivery counted and never ended."""
import threading
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from job_fixtures import (  # noqa: F401
    LAYER,
    STAT_LAYER,
    database_url,
    fast_params,
    make_world,
    save_generator,
    tiny_model,
    world,
)
from storage.db import session_scope
from storage.models import Artifact, Batch, BatchMerge, Model, Statistic, StatisticShard, utcnow
from storage.objects import ObjectNotFound, StorageUnavailable
from storage.statistics import insert_statistic, sample_spec
from workers.artifacts import put_file
from workers.batches import set_status, sweep
from workers.cache import WorkerCache
from workers.celery_app import make_celery
from workers.jobs import process_job
from workers.merge import process_merge
from workers.models import process_model
from workers.reconcile import _statistics_to_resend, reconcile_once
from workers.statistics import plan_shards, process_shard, process_statistic


def dead_deliveries(world, table, row_id, n):
    """What ``n`` deliveries whose worker died leave: counted, never ended, two hours ago."""
    with session_scope(world.session_factory) as session:
        session.execute(update(table).where(table.id == row_id).values(
            deliveries=n, delivered_at=utcnow() - timedelta(hours=2)))


def get(world, table, row_id):
    with session_scope(world.session_factory) as session:
        return session.get(table, row_id)


def uploaded_model(world, tmp_path, **columns) -> str:
    tenant = world.tenant()
    stored = put_file(world.session_factory, world.store, save_generator(tmp_path / "g.safetensors"), tenant, "models",
                      "model.safetensors")
    with session_scope(world.session_factory) as session:
        model = Model(**{"tenant_id": tenant, "name": "g", "architecture": "", "config": {}, "sha256": stored.sha256,
                         "size": stored.size, "object_key": stored.key, **columns})
        session.add(model)
        session.flush()
        return model.id


class DownStore:
    def open(self, key):
        raise StorageUnavailable("s3 is down")


# --- models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [{"z_dim": 0}, {"resolution": 0}, {"z_dim": -1}])
def test_any_error_from_the_tenants_config_fails_the_model(world, tmp_path, config):  # noqa: F811
    model_id = uploaded_model(world, tmp_path, architecture="demo-gan", config=config)
    assert process_model(world.session_factory, world.store, world.settings, model_id) == "failed"
    model = get(world, Model, model_id)
    assert model.error.startswith("config: ") and model.delivered_at is None


def test_a_model_whose_inspection_kills_workers_fails_worker_lost(world, tmp_path):  # noqa: F811
    model_id = uploaded_model(world, tmp_path)
    dead_deliveries(world, Model, model_id, world.settings.job_max_attempts)
    assert process_model(world.session_factory, world.store, world.settings, model_id) == "failed"
    model = get(world, Model, model_id)
    assert model.error.startswith("worker_lost: its inspection was delivered 3 times")
    assert model.deliveries == 4 and model.delivered_at is None
    # below the cap, the same checkpoint is inspected as usual
    other = uploaded_model(world, tmp_path)
    dead_deliveries(world, Model, other, world.settings.job_max_attempts - 1)
    assert process_model(world.session_factory, world.store, world.settings, other) == "ready"


def test_a_model_left_pending_by_a_store_outage_is_sent_again_by_the_reconciler(world, tmp_path,  # noqa: F811
                                                                                 redis_url):
    settings = replace(world.settings, storage_retry_seconds=0, reconcile_grace_seconds=1)
    model_id = uploaded_model(world, tmp_path)
    with pytest.raises(StorageUnavailable):
        process_model(world.session_factory, DownStore(), settings, model_id)
    model = get(world, Model, model_id)
    assert (model.status, model.deliveries, model.delivered_at) == ("pending", 1, None)
    assert "store is unavailable" in model.error

    celery = make_celery(replace(settings, broker_url=redis_url))
    with celery.connection_for_write() as connection:
        connection.default_channel.client.flushdb()
    later = utcnow() + timedelta(seconds=5)
    assert model_id in reconcile_once(world.session_factory, celery, settings, now=later).resent_models
    # its message waits in the broker: not sent twice
    assert model_id not in reconcile_once(world.session_factory, celery, settings, now=later).resent_models
    with celery.connection_for_write() as connection:
        connection.default_channel.client.flushdb()
    # a delivery under way (started, not ended, within the hard time limit) is not duplicated
    with session_scope(world.session_factory) as session:
        session.execute(update(Model).where(Model.id == model_id).values(delivered_at=utcnow()))
    assert model_id not in reconcile_once(world.session_factory, celery, settings, now=later).resent_models
    # the store is back: the next delivery inspects it
    assert process_model(world.session_factory, world.store, settings, model_id) == "ready"
    assert get(world, Model, model_id).error is None


# --- statistics -----------------------------------------------------------------------------

def new_statistic(world, model_id, spec=sample_spec(64)):
    with session_scope(world.session_factory) as session:
        model = session.get(Model, model_id)
        return insert_statistic(session, model.sha256, STAT_LAYER, spec).id, model.object_key


def test_a_statistic_whose_checkpoint_is_gone_fails_and_is_not_sent_again(world, tiny_model):  # noqa: F811
    stat_id, key = new_statistic(world, tiny_model.model_id)
    world.store.delete(key)
    with pytest.raises(ObjectNotFound):
        process_statistic(world.session_factory, world.store, world.settings, stat_id)
    stat = get(world, Statistic, stat_id)
    assert stat.status == "failed" and stat.error.startswith("checkpoint: ObjectNotFound")
    with session_scope(world.session_factory) as session:
        assert stat_id not in _statistics_to_resend(session, utcnow() + timedelta(seconds=60),
                                                    timedelta(seconds=30), 3900)


def test_a_statistic_whose_computation_kills_workers_fails_worker_lost(world, tiny_model):  # noqa: F811
    stat_id, _ = new_statistic(world, tiny_model.model_id)
    dead_deliveries(world, Statistic, stat_id, world.settings.job_max_attempts)
    assert process_statistic(world.session_factory, world.store, world.settings, stat_id) == "failed"
    stat = get(world, Statistic, stat_id)
    assert stat.error.startswith("worker_lost: compute_statistic was delivered 3 times")
    assert stat.fencing_token == 0  # never computed


def leased(world, stat_id, seconds):
    """The lease a worker holding the statistic leaves, expiring ``seconds`` from now."""
    with session_scope(world.session_factory) as session:
        session.execute(update(Statistic).where(Statistic.id == stat_id).values(
            status="computing", lease_owner="dead:1", fencing_token=1,
            lease_expires_at=utcnow() + timedelta(seconds=seconds)))


def test_giving_up_a_statistic_waits_out_the_dead_deliverys_lease(world, tiny_model):  # noqa: F811
    """The last dead delivery held the statistic's lease: the one that gives up waits for it
    to lapse rather than leave the statistic ``computing`` under a dead holder."""
    stat_id, _ = new_statistic(world, tiny_model.model_id)
    dead_deliveries(world, Statistic, stat_id, world.settings.job_max_attempts)
    leased(world, stat_id, 1.0)
    assert process_statistic(world.session_factory, world.store, world.settings, stat_id) == "failed"
    assert get(world, Statistic, stat_id).error.startswith("worker_lost: compute_statistic")


def test_giving_up_a_statistic_leaves_it_to_a_live_holder(world, tiny_model):  # noqa: F811
    """A lease renewed while the giving-up delivery waits has a live holder (a job
    computing the statistic): the statistic is left to it."""
    stat_id, _ = new_statistic(world, tiny_model.model_id)
    dead_deliveries(world, Statistic, stat_id, world.settings.job_max_attempts)
    leased(world, stat_id, 1.0)
    done = threading.Event()

    def holder():  # renews a third of its lease as a Heartbeat does, however late the reader comes
        while not done.wait(0.3):
            leased(world, stat_id, 1.0)

    renewer = threading.Thread(target=holder)
    renewer.start()
    try:
        assert process_statistic(world.session_factory, world.store, world.settings, stat_id) == "computing"
    finally:
        done.set()
        renewer.join()
    assert get(world, Statistic, stat_id).error is None


def test_a_shard_claimed_too_often_fails_worker_lost(world, tmp_path, tiny_model):  # noqa: F811
    sharded = make_world(world.settings.database_url, world.store, tmp_path, shard_samples=64)
    stat_id, _ = new_statistic(sharded, tiny_model.model_id, sample_spec(128))
    with session_scope(sharded.session_factory) as session:
        shard_ids = [s.id for s in plan_shards(session, session.get(Statistic, stat_id), 64)]
        # its workers died holding it, max_attempts times
        session.execute(update(StatisticShard).where(StatisticShard.id == shard_ids[0]).values(
            status="computing", attempts=sharded.settings.job_max_attempts, fencing_token=3,
            lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert process_shard(sharded.session_factory, sharded.store, sharded.settings, shard_ids[0]) is None
    shard = get(sharded, StatisticShard, shard_ids[0])
    assert shard.status == "failed" and shard.error.startswith("worker_lost: claimed 3 times")
    assert shard.fencing_token == 3  # not claimed again
    assert get(sharded, Statistic, stat_id).status == "failed"
    # the other shard is computed as usual
    assert process_shard(sharded.session_factory, sharded.store, sharded.settings, shard_ids[1]) == "computed"


# --- merges ---------------------------------------------------------------------------------

def copy_between(source, target):
    return {"operation": "copy", "copy": {"seed": source, "mask": [0.0, 0.0, 0.5, 0.5]},
            "paste": {"seed": target, "mask": [0.5, 0.5, 1.0, 1.0]},
            "context": [{"seed": target, "mask": [0.5, 0.5, 1.0, 1.0]}]}


class Sent:
    def __init__(self):
        self.sent = []

    def send_task(self, name, args=None, **kw):
        self.sent.append((name, args))


@pytest.fixture
def finalizing(world, tiny_model):  # noqa: F811
    """A merged batch of two succeeded members, finalizing: (batch id, member job ids)."""
    warm = WorkerCache(2, 4)
    with session_scope(world.session_factory) as session:
        batch = Batch(tenant_id=tiny_model.tenant_id, status="in_progress", merge=True, total_count=2)
        session.add(batch)
        session.flush()
        batch_id = batch.id
    jobs = [world.job(tiny_model.tenant_id, tiny_model.model_id, layer=LAYER, request=copy_between(a, b),
                      params=fast_params(steps=20), batch_id=batch_id, custom_id=f"m{a}")
            for a, b in ((1, 2), (5, 6))]
    for job in jobs:
        assert process_job(world.session_factory, world.store, world.settings, job, warm=warm) == "succeeded"
    with session_scope(world.session_factory) as session:
        assert set_status(session, batch_id, "in_progress", "finalizing")
    return batch_id, jobs


def merges(world, batch_id):
    with session_scope(world.session_factory) as session:
        return list(session.execute(select(BatchMerge.status, BatchMerge.error_code)
                                    .where(BatchMerge.batch_id == batch_id)))


def test_a_merge_whose_member_delta_is_gone_fails_and_the_batch_completes(world, finalizing):  # noqa: F811
    batch_id, jobs = finalizing
    with session_scope(world.session_factory) as session:
        key = session.scalar(select(Artifact.object_key).where(Artifact.job_id == jobs[1], Artifact.name == "delta"))
    world.store.delete(key)
    assert process_merge(world.session_factory, world.store, world.settings, batch_id) == "completed"
    assert merges(world, batch_id) == [("failed", "object_missing")]


def test_a_merge_that_kills_workers_fails_worker_lost(world, finalizing):  # noqa: F811
    batch_id, _ = finalizing
    dead_deliveries(world, Batch, batch_id, world.settings.job_max_attempts)
    assert process_merge(world.session_factory, world.store, world.settings, batch_id) == "completed"
    assert merges(world, batch_id) == [("failed", "worker_lost")]


def test_sweep_does_not_duplicate_a_merge_under_way(world, finalizing):  # noqa: F811
    batch_id, _ = finalizing
    old = utcnow() - timedelta(minutes=16)
    with session_scope(world.session_factory) as session:  # finalizing for 16 minutes, a delivery running
        session.execute(update(Batch).where(Batch.id == batch_id).values(
            updated_at=old, deliveries=1, delivered_at=utcnow() - timedelta(minutes=10)))
    # (the shared PostgreSQL database may hold other tests' batches: look at this one's messages)
    merge = ("workers.merge.merge_batch", [batch_id])
    sent = Sent()
    sweep(world.session_factory, sent, in_flight_seconds=3900)
    assert merge not in sent.sent
    # its worker died over an hour ago (past the hard time limit): sent again, once a pass
    with session_scope(world.session_factory) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(
            updated_at=old, delivered_at=utcnow() - timedelta(seconds=3901)))
    sweep(world.session_factory, sent, in_flight_seconds=3900)
    assert sent.sent.count(merge) == 1
