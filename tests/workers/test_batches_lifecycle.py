"""workers.batches against SQLite and PostgreSQL: counts recounted as members end, the
status machine (compare-and-set, illegal moves refused), finalizing with and without a
merge, cancel, failure, the job_ended hook, concurrent workers, and the sweep.

Tasks are sent through ``Sent``, a stand-in for the Celery app's ``send_task`` that
records (name, id): what reaches a real broker is tested in tests/api/test_batches.py
and tests/integration/test_batches_e2e.py."""
import secrets
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from storage import lifecycle
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Batch, Job, Model, Tenant, WebhookDelivery, utcnow
from workers import batches
from workers.batches import (
    DELIVER_WEBHOOK, MERGE_BATCH, IllegalBatchTransition, complete_batch, fail_batch, job_ended, refresh_batch,
    set_status, sweep,
)

HOOK = "https://hooks.example.com/batch"


class Sent:
    """What ``job_ended`` and friends need of the Celery app: the session factory, and
    ``send_task``, here recording instead of publishing."""

    def __init__(self, session_factory):
        self.session_factory = session_factory
        self.tasks = []
        self.lock = threading.Lock()

    def send_task(self, name, args, **options):
        with self.lock:
            self.tasks.append((name, args[0]))

    def named(self, name):
        return [object_id for task, object_id in self.tasks if task == name]


@pytest.fixture(params=["sqlite", "postgres"])
def session_factory(request):
    engine = make_engine(request.getfixturevalue(f"{request.param}_url"))
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def sent(session_factory):
    return Sent(session_factory)


def make_batch(session_factory, n=3, merge=False, webhook=HOOK, status="in_progress", job_webhook=None):
    with session_scope(session_factory) as session:
        tenant = Tenant(name=f"acme-{secrets.token_hex(4)}")
        session.add(tenant)
        session.flush()
        model = Model(tenant_id=tenant.id, name="m", architecture="demo-gan", sha256="0" * 64, size=1,
                      object_key="k", layers=[], status="ready")
        session.add(model)
        session.flush()
        batch = Batch(tenant_id=tenant.id, status=status, merge=merge, webhook_url=webhook, total_count=n)
        session.add(batch)
        session.flush()
        ids = [lifecycle.create_job(session, tenant_id=tenant.id, model_id=model.id, batch_id=batch.id,
                                    custom_id=f"c{i}", layer="layer3", request={}, params={},
                                    webhook_url=job_webhook).id for i in range(n)]
        return batch.id, ids


def end(session_factory, job_id, status, owner="w"):
    """What a worker does to a member: claim it, then finish it ``status``."""
    with session_scope(session_factory) as session:
        lease = lifecycle.claim(session, job_id, owner, ttl=60)
        if status != "running":
            lifecycle.finish(session, lease, status, **({"error_code": "boom", "error_message": "x"}
                                                         if status == "failed" else {}))


def read(session_factory, batch_id) -> Batch:
    with session_scope(session_factory) as session:
        return session.get(Batch, batch_id)


def counts(batch: Batch):
    return batch.status, (batch.succeeded_count, batch.failed_count, batch.cancelled_count)


def deliveries(session_factory, subject_id=None):
    with session_scope(session_factory) as session:
        query = select(WebhookDelivery)
        if subject_id is not None:
            query = query.where(WebhookDelivery.subject_id == subject_id)
        return list(session.scalars(query))


def test_counts_follow_members_then_the_batch_completes(session_factory, sent):
    batch_id, (a, b, c) = make_batch(session_factory)
    end(session_factory, a, "succeeded")
    assert refresh_batch(session_factory, batch_id, sent) == "in_progress"
    assert counts(read(session_factory, batch_id)) == ("in_progress", (1, 0, 0))
    end(session_factory, b, "failed")
    end(session_factory, c, "running")
    refresh_batch(session_factory, batch_id, sent)
    assert counts(read(session_factory, batch_id)) == ("in_progress", (1, 1, 0))
    assert sent.tasks == [] and deliveries(session_factory, batch_id) == []

    with session_scope(session_factory) as session:
        lease = lifecycle.Lease(c, "w", session.get(Job, c).fencing_token)
        lifecycle.finish(session, lease, "succeeded")
    assert refresh_batch(session_factory, batch_id, sent) == "completed"
    batch = read(session_factory, batch_id)
    assert counts(batch) == ("completed", (2, 1, 0)) and batch.finished_at is not None
    (delivery,) = deliveries(session_factory, batch_id)
    assert (delivery.event, delivery.url, delivery.status) == ("batch.completed", HOOK, "pending")
    assert sent.tasks == [(DELIVER_WEBHOOK, delivery.id)]

    # a late or repeated notice changes nothing and sends nothing
    assert refresh_batch(session_factory, batch_id, sent) == "completed"
    assert complete_batch(session_factory, batch_id, sent) is False
    assert len(sent.tasks) == 1 and len(deliveries(session_factory, batch_id)) == 1


def test_a_batch_whose_members_all_failed_is_completed(session_factory, sent):
    batch_id, ids = make_batch(session_factory, webhook=None)
    for job_id in ids:
        end(session_factory, job_id, "failed")
    assert refresh_batch(session_factory, batch_id, sent) == "completed"
    assert counts(read(session_factory, batch_id)) == ("completed", (0, 3, 0))
    assert sent.tasks == [] and deliveries(session_factory, batch_id) == []  # no webhook asked for


def test_a_merged_batch_waits_in_finalizing_for_its_merge(session_factory, sent):
    batch_id, ids = make_batch(session_factory, merge=True)
    for job_id in ids:
        end(session_factory, job_id, "succeeded")
    assert refresh_batch(session_factory, batch_id, sent) == "finalizing"
    assert refresh_batch(session_factory, batch_id, sent) == "finalizing"  # asked once only
    assert sent.tasks == [(MERGE_BATCH, batch_id)]
    assert counts(read(session_factory, batch_id)) == ("finalizing", (3, 0, 0))
    assert deliveries(session_factory, batch_id) == []

    assert complete_batch(session_factory, batch_id, sent) is True  # what merge_batch calls when done
    assert counts(read(session_factory, batch_id)) == ("completed", (3, 0, 0))
    assert sent.named(DELIVER_WEBHOOK) == [d.id for d in deliveries(session_factory, batch_id)]
    assert complete_batch(session_factory, batch_id, sent) is False


def test_cancelling_becomes_cancelled_when_the_last_member_stops(session_factory, sent):
    batch_id, (a, b, c) = make_batch(session_factory)
    end(session_factory, a, "succeeded")
    end(session_factory, b, "running")
    with session_scope(session_factory) as session:
        assert set_status(session, batch_id, "in_progress", "cancelling")
        lifecycle.request_cancel(session, b)
        lifecycle.request_cancel(session, c)
    assert refresh_batch(session_factory, batch_id, sent) == "cancelling"
    assert counts(read(session_factory, batch_id)) == ("cancelling", (1, 0, 1))
    with session_scope(session_factory) as session:
        lifecycle.finish(session, lifecycle.Lease(b, "w", session.get(Job, b).fencing_token), "cancelled")
    assert refresh_batch(session_factory, batch_id, sent) == "cancelled"
    batch = read(session_factory, batch_id)
    assert counts(batch) == ("cancelled", (1, 0, 2)) and batch.finished_at is not None
    assert [d.event for d in deliveries(session_factory, batch_id)] == ["batch.completed"]
    assert MERGE_BATCH not in dict(sent.tasks)


@pytest.mark.parametrize("current, wanted", [
    ("in_progress", "completed"), ("completed", "in_progress"), ("cancelled", "in_progress"),
    ("finalizing", "cancelling"), ("cancelling", "completed"), ("failed", "completed"),
])
def test_illegal_transitions_are_refused(session_factory, current, wanted):
    batch_id, _ = make_batch(session_factory, n=1, status=current)
    with session_scope(session_factory) as session:
        with pytest.raises(IllegalBatchTransition):
            set_status(session, batch_id, current, wanted)
    assert read(session_factory, batch_id).status == current


def test_transitions_are_compare_and_set(session_factory):
    batch_id, _ = make_batch(session_factory, n=1)
    with session_scope(session_factory) as session:
        assert set_status(session, batch_id, "in_progress", "finalizing") is True
        assert set_status(session, batch_id, "in_progress", "cancelling") is False  # it moved on first
    assert read(session_factory, batch_id).status == "finalizing"


def test_job_ended_queues_a_jobs_webhook_once_and_ignores_open_jobs(session_factory, sent):
    batch_id, (a, b) = make_batch(session_factory, n=2, webhook=None, job_webhook="https://hooks.example.com/job")
    job_ended(sent, a)  # still queued: nothing
    assert sent.tasks == [] and deliveries(session_factory, batch_id) == []
    end(session_factory, a, "succeeded")
    job_ended(sent, a)
    job_ended(sent, a)  # a redelivered message: no second notice
    (delivery,) = deliveries(session_factory, a)
    assert (delivery.event, delivery.url) == ("job.completed", "https://hooks.example.com/job")
    assert sent.named(DELIVER_WEBHOOK) == [delivery.id]
    assert counts(read(session_factory, batch_id)) == ("in_progress", (1, 0, 0))
    job_ended(sent, "job_does_not_exist")


def test_concurrent_workers_end_the_batch_exactly_once(session_factory, sent):
    """Eight threads end 24 members and call the hook at once: every count right, the
    batch completed once, one batch webhook."""
    n = 24
    batch_id, ids = make_batch(session_factory, n=n)
    statuses = ["succeeded", "failed", "cancelled"]
    barrier = threading.Barrier(8)
    errors = []

    def worker(k):
        try:
            barrier.wait()
            for i in range(k, n, 8):
                status = statuses[i % 3]
                if status == "cancelled":
                    with session_scope(session_factory) as session:
                        lifecycle.request_cancel(session, ids[i])
                else:
                    end(session_factory, ids[i], status, owner=f"w{k}")
                job_ended(sent, ids[i])
        except Exception as error:  # reported below, with the thread's traceback lost but its message kept
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    batch = read(session_factory, batch_id)
    assert counts(batch) == ("completed", (n // 3, n // 3, n // 3))
    assert len(deliveries(session_factory, batch_id)) == 1
    assert len(sent.named(DELIVER_WEBHOOK)) == 1


def test_fail_batch_ends_what_has_not_run(session_factory, sent):
    batch_id, (a, b, c) = make_batch(session_factory)
    end(session_factory, a, "succeeded")
    end(session_factory, b, "running")
    assert fail_batch(session_factory, batch_id, "queue_unavailable", "could not queue", sent) is True
    batch = read(session_factory, batch_id)
    assert (batch.status, batch.error_code, batch.failed_count) == ("failed", "queue_unavailable", 1)
    with session_scope(session_factory) as session:
        assert session.get(Job, b).cancel_requested and session.get(Job, b).status == "running"
        assert (session.get(Job, c).status, session.get(Job, c).error_code) == ("failed", "queue_unavailable")
    assert len(deliveries(session_factory, batch_id)) == 1
    assert fail_batch(session_factory, batch_id, "again", "x", sent) is False
    assert refresh_batch(session_factory, batch_id, sent) == "failed"  # a failed batch is never reopened


def test_sweep_repairs_lost_notices(session_factory, sent):
    lost, ids = make_batch(session_factory, webhook=None)
    for job_id in ids:
        end(session_factory, job_id, "succeeded")  # and no hook ran
    merged, merged_ids = make_batch(session_factory, n=1, merge=True)
    end(session_factory, merged_ids[0], "succeeded")
    refresh_batch(session_factory, merged, sent)  # finalizing; say its merge task was lost
    stuck, _ = make_batch(session_factory, n=1, status="finalizing")
    old = utcnow() - timedelta(hours=1)
    with session_scope(session_factory) as session:
        session.execute(update(Batch).where(Batch.id.in_([merged, stuck])).values(updated_at=old))
        delivery_id = batches.queue_webhook(session, session.get(Batch, stuck).tenant_id, "job.completed",
                                            merged_ids[0], HOOK)
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(updated_at=old))
    sent.tasks.clear()

    done = sweep(session_factory, sent, stale_seconds=600)
    assert done["refreshed"] >= 1 and done["merges_resent"] >= 1 and done["completed"] >= 1
    assert read(session_factory, lost).status == "completed"
    assert read(session_factory, stuck).status == "completed"
    assert merged in sent.named(MERGE_BATCH)
    assert delivery_id in sent.named(DELIVER_WEBHOOK)
