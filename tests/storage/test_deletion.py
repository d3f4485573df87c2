"""The deleted-object sweep on SQLite and PostgreSQL, against a file store and a real S3 server:
a worker reviving a key waits for a sweep that holds its record, and a store that fails
leaves the records for the next sweep."""
import io
import secrets
import threading
from datetime import timedelta

import pytest

from storage import deletion
from storage.db import session_scope
from storage.models import DeletedObject, utcnow
from storage.objects import ObjectNotFound, StorageUnavailable, open_store


def record(session_factory, key: str, age_s: float) -> None:
    with session_scope(session_factory) as session:
        deletion.record_deleted(session, [key], now=utcnow() - timedelta(seconds=age_s))


def recorded(session_factory, key: str) -> bool:
    with session_scope(session_factory) as session:
        return session.get(DeletedObject, key) is not None


def exists(store, key: str) -> bool:
    try:
        store.open(key).close()
        return True
    except ObjectNotFound:
        return False


def tenant_and_model(session, name: str, sha256: str = "0" * 64):
    """A fresh tenant (``name`` and a random suffix) with one ready model, flushed."""
    from storage.models import Model, Tenant

    tenant = Tenant(name=f"{name}-{secrets.token_hex(6)}")
    session.add(tenant)
    session.flush()
    model = Model(tenant_id=tenant.id, name="m", architecture="a", sha256=sha256, size=1, object_key="k",
                  status="ready")
    session.add(model)
    session.flush()
    return tenant, model


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/objects")
    return open_store(request.getfixturevalue("s3_storage_url"),
                      s3_endpoint_url=request.getfixturevalue("s3_server"))


def test_only_records_past_the_grace_are_swept(session_factory, store):
    old, new = (f"tenants/t/delta/{secrets.token_hex(8)}/delta.safetensors" for _ in range(2))
    for key in (old, new):
        store.put(key, io.BytesIO(b"x"))
    record(session_factory, old, age_s=120)
    record(session_factory, new, age_s=10)
    deletion.sweep(session_factory, store, grace_seconds=60)
    assert not exists(store, old) and not recorded(session_factory, old)
    assert exists(store, new) and recorded(session_factory, new)


def test_the_sweep_keeps_a_resume_state_a_queued_job_names(session_factory, tmp_path):
    """Two handed-back jobs with the same state share its content-addressed object: one job
    ending does not take it from the other."""
    from storage import lifecycle

    store = open_store(f"file://{tmp_path}/objects")
    key = f"tenants/t/resume/{secrets.token_hex(32)}/insert_state.safetensors"
    store.put(key, io.BytesIO(b"state"))
    with session_scope(session_factory) as session:
        tenant, model = tenant_and_model(session, "resume")
        job = lifecycle.create_job(session, tenant_id=tenant.id, model_id=model.id, layer="l")
        session.flush()
        job.resume_object_key = key
    record(session_factory, key, age_s=120)  # the other job ended
    deletion.sweep(session_factory, store, grace_seconds=60)
    assert exists(store, key)


class WatchedStore:
    """The real store; ``during_delete`` runs inside the sweep's transaction, at each delete."""

    def __init__(self, store, during_delete):
        self.store, self.during_delete = store, during_delete

    def delete(self, key):
        self.during_delete(key)
        self.store.delete(key)


def test_a_worker_reviving_a_key_waits_for_the_sweep_then_puts_it_again(session_factory, tmp_path):
    store = open_store(f"file://{tmp_path}/objects")
    key = f"tenants/t/checkpoint/{secrets.token_hex(8)}/model.safetensors"
    store.put(key, io.BytesIO(b"weights"))
    record(session_factory, key, age_s=120)
    revived = threading.Event()

    def worker():  # workers.artifacts.put_file: revive (committed), then put
        with session_scope(session_factory) as session:
            deletion.revive(session, key)
        revived.set()
        store.put(key, io.BytesIO(b"weights"))

    threads = []

    def start_worker(_key):
        threads.append(threading.Thread(target=worker))
        threads[0].start()
        # the sweep holds the record: the revive waits for its commit
        assert not revived.wait(1.0)

    deletion.sweep(session_factory, WatchedStore(store, start_worker), grace_seconds=60)
    threads[0].join(10)
    assert revived.is_set()
    assert exists(store, key)  # put again after the sweep deleted it
    assert not recorded(session_factory, key)


def test_a_store_that_fails_keeps_the_records(session_factory, tmp_path):
    store = open_store(f"file://{tmp_path}/objects")
    key = f"tenants/t/preview/{secrets.token_hex(8)}/preview.png"
    store.put(key, io.BytesIO(b"png"))
    record(session_factory, key, age_s=120)

    def fail(_key):
        raise StorageUnavailable("the store is away")

    with pytest.raises(StorageUnavailable):
        deletion.sweep(session_factory, WatchedStore(store, fail), grace_seconds=60)
    assert recorded(session_factory, key) and exists(store, key)
    deletion.sweep(session_factory, store, grace_seconds=60)
    assert not recorded(session_factory, key) and not exists(store, key)


def test_a_big_batch_with_chained_members_goes_in_one_delete(session_factory):
    """10,000 members with 40,000 artifacts (over the databases' bind-parameter limits in one
    INSERT), one member chained on another: the batch goes whole, every key recorded."""
    from sqlalchemy import func, insert, select

    from storage.models import Artifact, Batch, Job

    members = 10_000
    with session_scope(session_factory) as session:
        tenant, model = tenant_and_model(session, "big")
        batch = Batch(tenant_id=tenant.id, status="completed", total_count=members)
        session.add(batch)
        session.flush()
        ids = [f"job_{secrets.token_hex(12)}" for _ in range(members)]
        session.execute(insert(Job), [dict(id=job_id, tenant_id=tenant.id, model_id=model.id, batch_id=batch.id,
                                           custom_id=str(n), layer="l", status="succeeded",
                                           base_job_id=ids[0] if n == 1 else None)
                                      for n, job_id in enumerate(ids)])
        keys = [f"tenants/{tenant.id}/{name}/{job_id}/f" for job_id in ids
                for name in ("delta", "checkpoint", "preview", "metrics")]
        session.execute(insert(Artifact), [dict(job_id=key.split("/")[3], name=key.split("/")[2], object_key=key,
                                                sha256="0" * 64, size=1) for key in keys])
        batch_id = batch.id
    with session_scope(session_factory) as session:
        deletion.delete_batch(session, session.get(Batch, batch_id))
    with session_scope(session_factory) as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.id.in_(ids[:2]))) == 0
        assert session.get(Batch, batch_id) is None
        recorded_keys = session.scalar(select(func.count()).select_from(DeletedObject).where(
            DeletedObject.object_key.like(f"tenants/{tenant.id}/%")))
        assert recorded_keys == len(keys)
        session.execute(DeletedObject.__table__.delete().where(DeletedObject.object_key.like(f"tenants/{tenant.id}/%")))


def test_only_statistics_of_hashes_no_row_holds_are_swept(session_factory, tmp_path):
    from sqlalchemy import select

    from storage.models import Artifact, Batch, BatchMerge, Job, Statistic

    store = open_store(f"file://{tmp_path}/objects")
    day_ago = utcnow() - timedelta(days=1)
    with session_scope(session_factory) as session:
        by_model, by_checkpoint, by_preview, by_merge, orphan = (secrets.token_hex(32) for _ in range(5))
        tenant, model = tenant_and_model(session, "stats", sha256=by_model)
        job = Job(tenant_id=tenant.id, model_id=model.id, layer="l", status="succeeded")
        session.add(job)
        session.flush()
        session.add_all([Artifact(job_id=job.id, name="checkpoint", object_key="c", sha256=by_checkpoint, size=1),
                         Artifact(job_id=job.id, name="preview", object_key="p", sha256=by_preview, size=1)])
        batch = Batch(tenant_id=tenant.id, status="completed")
        session.add(batch)
        session.flush()
        session.add(BatchMerge(batch_id=batch.id, model_sha256="0" * 64, checkpoint_sha256=by_merge, layer="l",
                               status="succeeded", rules=1))
        stats = {sha: Statistic(model_sha256=sha, layer="l", sample_spec="s", status="ready", updated_at=day_ago,
                                object_key=f"shared/statistics/{sha}/m")
                 for sha in (by_model, by_checkpoint, by_preview, by_merge, orphan)}
        session.add_all(stats.values())
        session.flush()
        ids = {sha: stat.id for sha, stat in stats.items()}
    deletion.sweep(session_factory, store, grace_seconds=60)
    with session_scope(session_factory) as session:
        left = set(session.scalars(select(Statistic.model_sha256).where(Statistic.id.in_(ids.values()))))
    # a preview's hash holds nothing: only checkpoints, models and merges hold a statistic
    assert left == {by_model, by_checkpoint, by_merge}
    assert recorded(session_factory, f"shared/statistics/{orphan}/m")
    assert recorded(session_factory, f"shared/statistics/{by_preview}/m")


def test_partial_moments_are_kept_while_named_and_go_with_their_statistic(session_factory, tmp_path):
    from storage.models import Statistic, StatisticShard

    store = open_store(f"file://{tmp_path}/objects")
    day_ago = utcnow() - timedelta(days=1)
    keys = {name: f"shared/statistic_resume/{secrets.token_hex(32)}/second_moment.safetensors"
            for name in ("pending", "shard", "failed", "failed_shard")}
    for key in keys.values():
        store.put(key, io.BytesIO(b"moment"))
    with session_scope(session_factory) as session:
        # the model holds the pending statistic's hash
        tenant, model = tenant_and_model(session, "partials", sha256=secrets.token_hex(32))
        pending = Statistic(model_sha256=model.sha256, layer="l", sample_spec="s", status="pending",
                            resume_object_key=keys["pending"], shard_count=1)
        orphan = Statistic(model_sha256=secrets.token_hex(32), layer="l", sample_spec="s", status="failed",
                           updated_at=day_ago, resume_object_key=keys["failed"], shard_count=1)
        session.add_all([pending, orphan])
        session.flush()
        session.add_all([StatisticShard(statistic_id=stat.id, number=0, seed_start=0, seed_stop=64, status="pending",
                                        resume_object_key=key)
                         for stat, key in ((pending, keys["shard"]), (orphan, keys["failed_shard"]))])
    for key in (keys["pending"], keys["shard"]):
        record(session_factory, key, age_s=120)  # another row that named the same bytes ended
    deletion.sweep(session_factory, store, grace_seconds=60)
    assert exists(store, keys["pending"]) and exists(store, keys["shard"])
    # the orphaned statistic's partial moments are recorded with it, and go a grace later
    assert recorded(session_factory, keys["failed"]) and recorded(session_factory, keys["failed_shard"])
    deletion.sweep(session_factory, store, grace_seconds=60, now=utcnow() + timedelta(seconds=120))
    assert not exists(store, keys["failed"]) and not exists(store, keys["failed_shard"])


def test_jobs_and_batches_expire_leaves_first_and_wait_for_younger_dependents(session_factory):
    from datetime import datetime, timezone

    from sqlalchemy import select

    from storage.models import Artifact, Batch, Job

    old = datetime(2000, 1, 1, tzinfo=timezone.utc)  # no other test's rows ended this long ago
    with session_scope(session_factory) as session:
        tenant, model = tenant_and_model(session, "expire")
        old_batch = Batch(tenant_id=tenant.id, status="completed", finished_at=old, input_object_key=f"in-{tenant.id}")
        held_batch = Batch(tenant_id=tenant.id, status="completed", finished_at=old)
        young_batch = Batch(tenant_id=tenant.id, status="completed", finished_at=utcnow())
        session.add_all([old_batch, held_batch, young_batch])
        session.flush()

        def job(name, status="succeeded", finished_at=old, **columns):
            made = Job(id=f"job_{name}_{secrets.token_hex(6)}", tenant_id=tenant.id, model_id=model.id, layer="l",
                       status=status, finished_at=finished_at, **columns)
            session.add(made)
            session.flush()
            return made

        alone = job("alone", status="failed")
        session.add(Artifact(job_id=alone.id, name="delta", object_key=f"key-{alone.id}", sha256="0" * 64, size=1))
        chain_base = job("chain_base")
        chain_top = job("chain_top", status="cancelled", base_job_id=chain_base.id)
        held = job("held")
        young = job("young", finished_at=utcnow(), base_job_id=held.id)
        running = job("running", status="running", finished_at=None)
        old_member = job("old_member", batch_id=old_batch.id)
        young_member = job("young_member", batch_id=young_batch.id)
        held_member = job("held_member", batch_id=held_batch.id)
        outside = job("outside", finished_at=utcnow(), base_job_id=held_member.id)
        expected_gone = {alone.id, chain_base.id, chain_top.id, old_member.id}
        kept = {held.id, young.id, running.id, young_member.id, held_member.id, outside.id}
        batches = {"gone": old_batch.id, "held": held_batch.id, "young": young_batch.id}

    now = datetime(2001, 1, 1, tzinfo=timezone.utc)
    counts = deletion.expire(session_factory, retention_seconds=86400, now=now)
    assert counts == {"jobs": 3, "batches": 1}  # the chain's base in a second round of the same pass
    with session_scope(session_factory) as session:
        left = set(session.scalars(select(Job.id).where(Job.id.in_(expected_gone | kept))))
        left_batches = set(session.scalars(select(Batch.id).where(Batch.id.in_(batches.values()))))
    assert left == kept
    assert left_batches == {batches["held"], batches["young"]}
    assert recorded(session_factory, f"key-{alone.id}") and recorded(session_factory, f"in-{tenant.id}")
    # nothing more is due: a second pass deletes nothing
    assert deletion.expire(session_factory, retention_seconds=86400, now=now) == {"jobs": 0, "batches": 0}


def test_batches_that_outside_jobs_hold_do_not_take_the_places_of_younger_expired_ones(session_factory,
                                                                                          monkeypatch):
    from datetime import datetime, timezone

    from sqlalchemy import select

    from storage.models import Batch, Job

    monkeypatch.setattr(deletion, "EXPIRE_LIMIT", 2)  # batches one pass looks at
    oldest = datetime(1990, 1, 1, tzinfo=timezone.utc)  # before every other test's rows
    with session_scope(session_factory) as session:
        tenant, model = tenant_and_model(session, "held")
        held = [Batch(tenant_id=tenant.id, status="completed", finished_at=oldest + timedelta(days=i))
                for i in range(3)]
        due = Batch(tenant_id=tenant.id, status="completed", finished_at=oldest + timedelta(days=10))
        session.add_all([*held, due])
        session.flush()
        for batch in held:  # each batch's member is the base of a live job outside it
            member = Job(tenant_id=tenant.id, model_id=model.id, layer="l", status="succeeded",
                         finished_at=batch.finished_at, batch_id=batch.id)
            session.add(member)
            session.flush()
            session.add(Job(tenant_id=tenant.id, model_id=model.id, layer="l", status="queued",
                            base_job_id=member.id))
        ids = [b.id for b in held] + [due.id]
    deletion.expire(session_factory, retention_seconds=86400, now=datetime(1991, 1, 1, tzinfo=timezone.utc))
    with session_scope(session_factory) as session:
        left = set(session.scalars(select(Batch.id).where(Batch.id.in_(ids))))
    assert left == set(ids[:3])
