"""The reconciler's pass (``workers.reconcile.reconcile_once``) against a real Redis of the
test's own and a real database, without workers: what it re-sends, what it leaves alone,
and whom it gives up on. Deliveries to a "dead worker" are real: a kombu consumer takes
the message and never acknowledges it."""
from datetime import timedelta

import pytest
from kombu import Consumer
from sqlalchemy import select, update

from faults import RedisServer
from palimpsest.config import load_settings
from storage import lifecycle
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Job, JobEvent, Model, Statistic, Tenant, utcnow
from workers.celery_app import make_celery
from workers.reconcile import COMPUTE_STATISTIC, RESENT, RUN_JOB, broker_messages, reconcile_once

GRACE = 1


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["redis", "embedded"])
def world(request, tmp_path, sqlite_url):
    """A database, a broker (the test's Redis, flushed; or the embedded SQL broker), a Celery app."""
    env = {"PALIMPSEST_DATA_DIR": str(tmp_path), "PALIMPSEST_DATABASE_URL": sqlite_url,
           "PALIMPSEST_RECONCILE_GRACE_SECONDS": str(GRACE), "PALIMPSEST_JOB_MAX_ATTEMPTS": "3"}
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        server.client().flushall()
        env["PALIMPSEST_BROKER_URL"] = server.url
    settings = load_settings(env)
    celery = make_celery(settings)
    engine = make_engine(sqlite_url)
    session_factory = make_session_factory(engine)
    with session_scope(session_factory) as s:
        tenant = Tenant(name="acme")
        model = Model(name="demo", architecture="demo-gan", sha256="0" * 64, size=1, object_key="m")
        s.add_all([tenant, model])
        s.flush()
        ids = (tenant.id, model.id)
    yield celery, settings, session_factory, ids
    engine.dispose()


def new_job(session_factory, ids, age_s=60, priority=5) -> str:
    """A queued job created ``age_s`` seconds ago."""
    with session_scope(session_factory) as s:
        job = lifecycle.create_job(s, tenant_id=ids[0], model_id=ids[1], layer="layer4", priority=priority)
        s.execute(update(Job).where(Job.id == job.id).values(created_at=utcnow() - timedelta(seconds=age_s)))
        return job.id


def running_job(session_factory, ids, expired: bool, attempts: int = 1) -> str:
    job_id = new_job(session_factory, ids)
    with session_scope(session_factory) as s:
        lifecycle.claim(s, job_id, "host:1", ttl=30, now=utcnow() - timedelta(seconds=60 if expired else 0))
        s.execute(update(Job).where(Job.id == job_id).values(attempts=attempts))
    return job_id


def waiting(celery, settings) -> dict:
    return broker_messages(celery, utcnow() - timedelta(seconds=settings.reconcile_grace_seconds))


def resent_events(session_factory, job_id) -> list:
    with session_scope(session_factory) as s:
        return list(s.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id,
                                                             JobEvent.message.like(f"{RESENT}%"))))


def test_a_queued_job_whose_message_was_lost_is_sent_again_once(world):
    celery, settings, session_factory, ids = world
    lost, kept, young = new_job(session_factory, ids), new_job(session_factory, ids), new_job(session_factory, ids, 0)
    celery.send_task(RUN_JOB, args=[kept])  # this one's message is in the broker

    report = reconcile_once(session_factory, celery, settings)
    assert report.resent_jobs == [lost]  # the young one may still be on its way from the API
    assert waiting(celery, settings)[RUN_JOB] == {lost, kept}
    assert len(resent_events(session_factory, lost)) == 1
    # the next pass finds its message: no duplicate
    assert reconcile_once(session_factory, celery, settings).resent_jobs == []


def test_expired_leases_are_sent_again_live_ones_left_alone(world):
    celery, settings, session_factory, ids = world
    dead, alive = running_job(session_factory, ids, expired=True), running_job(session_factory, ids, expired=False)
    report = reconcile_once(session_factory, celery, settings)
    assert report.resent_jobs == [dead]
    assert waiting(celery, settings)[RUN_JOB] == {dead}
    message = resent_events(session_factory, dead)[0]
    assert "lease of host:1 expired" in message
    # a claim by the next worker takes the lease over; the events say so
    with session_scope(session_factory) as s:
        assert lifecycle.claim(s, dead, "host:2", ttl=30) is not None
    with session_scope(session_factory) as s:
        last = s.scalars(select(JobEvent).where(JobEvent.job_id == dead).order_by(JobEvent.seq.desc())).first()
    assert (last.status, last.message) == ("running", "lease of host:1 expired; taken over by host:2")


def test_a_job_whose_workers_keep_dying_fails_worker_lost_once(world):
    celery, settings, session_factory, ids = world
    job_id = running_job(session_factory, ids, expired=True, attempts=3)  # PALIMPSEST_JOB_MAX_ATTEMPTS=3
    report = reconcile_once(session_factory, celery, settings)
    assert (report.failed_jobs, report.resent_jobs) == ([job_id], [])
    with session_scope(session_factory) as s:
        job = s.get(Job, job_id)
        transitions = list(s.scalars(select(JobEvent.status).where(JobEvent.job_id == job_id,
                                                                   JobEvent.kind == "transition")))
    assert (job.status, job.error_code) == ("failed", "worker_lost")
    assert transitions == ["queued", "running", "failed"]
    assert reconcile_once(session_factory, celery, settings).failed_jobs == []


def test_a_claim_gives_up_too(world):
    """A delivery that arrives before the reconciler (a redelivery) applies the same policy."""
    _, _, session_factory, ids = world
    job_id = running_job(session_factory, ids, expired=True, attempts=3)
    with session_scope(session_factory) as s:
        assert lifecycle.claim(s, job_id, "host:2", ttl=30, max_attempts=3) is None
    with session_scope(session_factory) as s:
        assert (s.get(Job, job_id).status, s.get(Job, job_id).error_code) == ("failed", "worker_lost")
    other = running_job(session_factory, ids, expired=True, attempts=2)
    with session_scope(session_factory) as s:
        assert lifecycle.claim(s, other, "host:2", ttl=30, max_attempts=3).token == 2


def test_a_delivery_to_a_dead_worker_counts_as_lost_after_the_grace_period(world):
    """Redis: a message delivered and never acknowledged (the worker died after taking it)
    comes back only after the visibility timeout; the reconciler re-sends the job once the
    delivery is older than the grace period. The embedded broker forgets it at once."""
    celery, settings, session_factory, ids = world
    job_id = new_job(session_factory, ids)
    celery.send_task(RUN_JOB, args=[job_id])
    got = []
    with celery.connection_for_read() as connection:
        queue = next(q for q in celery.conf.task_queues if q.name == "gpu")
        with Consumer(connection, [queue], callbacks=[lambda body, message: got.append(message)],
                      accept=["json"], prefetch_count=1):
            connection.drain_events(timeout=10)
            assert len(got) == 1  # taken, never acknowledged
            redis = celery.conf.broker_url.startswith("redis")
            if redis:
                assert reconcile_once(session_factory, celery, settings).resent_jobs == []  # fresh delivery
                import time

                time.sleep(GRACE + 0.5)
            assert reconcile_once(session_factory, celery, settings).resent_jobs == [job_id]


def test_statistics_without_a_live_lease_get_their_task_again(world):
    celery, settings, session_factory, ids = world
    old = utcnow() - timedelta(seconds=60)
    rows = {}
    with session_scope(session_factory) as s:
        for name, status, lease in [("dead", "computing", old), ("alive", "computing", utcnow() + timedelta(60)),
                                    ("lost", "pending", None), ("ready", "ready", None), ("failed", "failed", None)]:
            row = Statistic(model_sha256="0" * 64, layer="layer4", sample_spec=f"seeds:0-{len(rows) + 1}",
                            status=status, lease_expires_at=lease, updated_at=old)
            s.add(row)
            s.flush()
            rows[name] = row.id
    report = reconcile_once(session_factory, celery, settings)
    assert sorted(report.resent_statistics) == sorted([rows["dead"], rows["lost"]])
    assert waiting(celery, settings)[COMPUTE_STATISTIC] == {rows["dead"], rows["lost"]}
    assert reconcile_once(session_factory, celery, settings).resent_statistics == []


def test_after_flushall_only_the_lost_messages_are_sent_again(world, redis_server):
    """FLUSHALL loses every message (queued and delivered); what is sent afterwards still
    arrives (Celery publishes to a direct queue by name, needing no binding)."""
    celery, settings, session_factory, ids = world
    if not celery.conf.broker_url.startswith("redis"):
        pytest.skip("Redis only")
    lost = [new_job(session_factory, ids) for _ in range(3)]
    for job_id in lost:
        celery.send_task(RUN_JOB, args=[job_id])
    redis_server.client().flushall()
    after = new_job(session_factory, ids)
    celery.send_task(RUN_JOB, args=[after])
    report = reconcile_once(session_factory, celery, settings)
    assert sorted(report.resent_jobs) == sorted(lost)
    assert waiting(celery, settings)[RUN_JOB] == {*lost, after}


@pytest.mark.slow
def test_a_pass_over_ten_thousand_queued_jobs(redis_server, tmp_path, figures):
    """A long queue is normal overnight: a pass that finds every message costs well under a
    second; after FLUSHALL it re-sends all 10,000, each once (PostgreSQL + Redis)."""
    import time

    from faults import own_database
    from storage.migrate import upgrade
    from storage.models import new_id

    redis_server.client().flushall()
    with own_database() as url:
        upgrade(url)
        settings = load_settings({"PALIMPSEST_DATA_DIR": str(tmp_path), "PALIMPSEST_DATABASE_URL": url,
                                  "PALIMPSEST_BROKER_URL": redis_server.url})
        celery, engine = make_celery(settings), make_engine(url)
        session_factory = make_session_factory(engine)
        try:
            with session_scope(session_factory) as s:
                tenant = Tenant(name="acme")
                model = Model(name="demo", architecture="demo-gan", sha256="0" * 64, size=1, object_key="m")
                s.add_all([tenant, model])
                s.flush()
                old = utcnow() - timedelta(hours=1)
                ids = [new_id("job") for _ in range(10_000)]
                s.execute(Job.__table__.insert(), [
                    dict(id=i, tenant_id=tenant.id, model_id=model.id, layer="layer4", request={}, params={},
                         status="queued", priority=5, created_at=old, updated_at=old, attempts=0, fencing_token=0,
                         cancel_requested=False) for i in ids])
            with celery.producer_pool.acquire(block=True) as producer:
                for job_id in ids:
                    celery.send_task(RUN_JOB, args=[job_id], producer=producer)
            started = time.monotonic()
            assert reconcile_once(session_factory, celery, settings).resent_jobs == []
            listed_s = time.monotonic() - started
            redis_server.client().flushall()
            started = time.monotonic()
            assert sorted(reconcile_once(session_factory, celery, settings).resent_jobs) == sorted(ids)
            resent_s = time.monotonic() - started
            assert len(waiting(celery, settings)[RUN_JOB]) == 10_000
            assert reconcile_once(session_factory, celery, settings).resent_jobs == []
        finally:
            engine.dispose()
    figures.update(queued=10_000, pass_with_messages_s=round(listed_s, 2), pass_resending_all_s=round(resent_s, 2))


def test_the_pass_sweeps_batches_whose_last_notice_was_lost(world):
    """A batch whose members all ended, but whose last member's hook never ran (its
    worker died after the commit), is completed by the reconciler, not left in_progress."""
    from storage.models import Batch

    celery, settings, session_factory, ids = world
    with session_scope(session_factory) as s:
        batch = Batch(tenant_id=ids[0], status="in_progress", total_count=2)
        s.add(batch)
        s.flush()
        batch_id = batch.id
    jobs = [new_job(session_factory, ids) for _ in range(2)]
    with session_scope(session_factory) as s:
        s.execute(update(Job).where(Job.id.in_(jobs)).values(batch_id=batch_id, status="succeeded",
                                                             finished_at=utcnow()))
    report = reconcile_once(session_factory, celery, settings)
    assert report.batches["refreshed"] == 1 and report.acted is False  # a recount is not a repair
    with session_scope(session_factory) as s:
        batch = s.get(Batch, batch_id)
        assert (batch.status, batch.succeeded_count, batch.total_count) == ("completed", 2, 2)


def test_the_pass_sweeps_deleted_objects_past_their_grace(world):
    import io

    from storage import deletion

    celery, settings, session_factory, _ = world
    key = "tenants/t/delta/" + "1" * 64 + "/delta.safetensors"
    celery.store.put(key, io.BytesIO(b"delta"))
    with session_scope(session_factory) as s:
        deletion.record_deleted(s, [key], now=utcnow() - timedelta(seconds=settings.deletion_grace_seconds + 1))
    report = reconcile_once(session_factory, celery, settings)
    assert report.deleted["objects"] == 1
    assert "deleted 1 objects" in str(report)
    assert not celery.store.exists(key)


def test_the_pass_expires_jobs_that_ended_before_the_retention(world):
    from dataclasses import replace

    celery, settings, session_factory, ids = world
    old, young = new_job(session_factory, ids), new_job(session_factory, ids)
    with session_scope(session_factory) as s:
        for job_id, ended_s in ((old, 7200), (young, 60)):
            s.execute(update(Job).where(Job.id == job_id).values(status="succeeded",
                                                                 finished_at=utcnow() - timedelta(seconds=ended_s)))
    assert reconcile_once(session_factory, celery, settings).expired == {}  # off by default
    report = reconcile_once(session_factory, celery, replace(settings, retention_seconds=3600))
    assert report.expired == {"jobs": 1, "batches": 0} and report.acted
    assert "expired 1 jobs and 0 batches" in str(report)
    with session_scope(session_factory) as s:
        assert set(s.scalars(select(Job.id).where(Job.id.in_([old, young])))) == {young}
