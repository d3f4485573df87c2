"""Batches after submission: their status, their request counts, their end, and the
webhook notices that completions queue.

    validating -> in_progress -> finalizing -> completed
    in_progress -> cancelling -> cancelled
    validating | in_progress | finalizing | cancelling -> failed

``set_status`` is the one place a batch changes state: a compare-and-set ``UPDATE ...
WHERE status = <expected>``, like ``storage.lifecycle`` for jobs. ``failed`` is for a
batch that could not be processed at all (its jobs could not be queued); a batch whose
members all failed still ends ``completed``, with its counts saying so.

Counts are recounted, never incremented: ``refresh_batch`` reads the members' statuses
with one ``GROUP BY`` and writes the counts, so a notice that comes twice, late, or
never (the next one, or ``sweep``, repairs it) cannot make them wrong. When it finds no
member queued or running, it moves the batch on: ``in_progress -> finalizing`` (then
``workers.merge.merge_batch`` for a merged batch, which calls ``complete_batch`` when
done, else ``complete_batch`` at once), or ``cancelling -> cancelled``. The worker that
ends the last member makes that move, since its recount runs after its own commit.

``job_ended(celery, job_id)`` is the hook ``workers.jobs.run_job`` calls after every
delivery: it queues the job's webhook (if it has one) and refreshes its batch.

Webhooks use an outbox: a ``WebhookDelivery`` row is inserted (once per event and
subject, whoever notices first) in the transaction that records the completion, and
``workers.webhooks.deliver_webhook`` is sent, by name, after the commit.

No torch and no Celery tasks here: the API imports this module (batch cancel, and the
batch resource), and tasks are sent by name through the Celery app it is given.
"""
import logging
from datetime import timedelta

from kombu.exceptions import OperationalError
from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from storage.db import session_scope
from storage.models import BATCH_TERMINAL_STATUSES, Batch, Job, WebhookDelivery, new_id, utcnow
from workers.deliveries import not_in_flight

log = logging.getLogger(__name__)

MERGE_BATCH = "workers.merge.merge_batch"
DELIVER_WEBHOOK = "workers.webhooks.deliver_webhook"

ALLOWED = {
    "validating": {"in_progress", "failed"},
    "in_progress": {"finalizing", "cancelling", "failed"},
    "finalizing": {"completed", "failed"},
    "cancelling": {"cancelled", "failed"},
    "completed": set(),
    "failed": set(),
    "cancelled": set(),
}
OPEN_JOB_STATUSES = ("queued", "running")


class IllegalBatchTransition(Exception):
    def __init__(self, batch_id: str, current: str, wanted: str):
        super().__init__(f"batch {batch_id} is {current}; it cannot become {wanted}")
        self.batch_id, self.current, self.wanted = batch_id, current, wanted


def set_status(session, batch_id: str, current: str, wanted: str, **values) -> bool:
    """Move the batch from ``current`` to ``wanted`` (with other column ``values``) if it is
    still ``current``; False when it changed first. The caller commits."""
    if wanted not in ALLOWED[current]:
        raise IllegalBatchTransition(batch_id, current, wanted)
    if wanted in BATCH_TERMINAL_STATUSES:
        values.setdefault("finished_at", utcnow())
    result = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == current)
                             .values(status=wanted, updated_at=utcnow(), **values)
                             .execution_options(synchronize_session=False))
    return result.rowcount == 1


def member_counts(session, batch_id: str) -> dict[str, int]:
    """Members by status: {"queued": n, "running": n, "succeeded": n, ...} (absent: 0)."""
    rows = session.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status))
    return {status: count for status, count in rows}


def count_columns(counts: dict[str, int]) -> dict:
    return {"succeeded_count": counts.get("succeeded", 0), "failed_count": counts.get("failed", 0),
            "cancelled_count": counts.get("cancelled", 0)}


def _send(celery, name: str, object_id: str) -> bool:
    """Send a task by name after a commit; a broker failure is logged, not raised: the
    database already holds what the task would act on, and ``sweep`` sends it again."""
    if celery is None:
        from celery import current_app as celery
    try:
        celery.send_task(name, args=[object_id])
        return True
    except (OperationalError, OSError) as error:
        log.error("could not send %s(%s): %s", name, object_id, error)
        return False


# -- webhook outbox --------------------------------------------------------------------------

def queue_webhook(session, tenant_id: str, event: str, subject_id: str, url: str | None) -> str | None:
    """Insert the delivery of ``event`` about ``subject_id`` unless one exists; return its
    id when this call inserted it (then the caller sends it after committing), else None."""
    if not url:
        return None
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[session.get_bind().dialect.name]
    now = utcnow()
    # Core inserts skip the ORM's Python-side defaults, so they are given here.
    return session.scalar(insert(WebhookDelivery).values(
        id=new_id("whd"), tenant_id=tenant_id, event=event, subject_id=subject_id, url=url, status="pending",
        attempts=0, created_at=now, updated_at=now,
    ).on_conflict_do_nothing(index_elements=["event", "subject_id"]).returning(WebhookDelivery.id))


# -- ending ----------------------------------------------------------------------------------

def job_ended(celery, job_id: str) -> None:
    """After a delivery of ``run_job``: if the job is finished, queue its webhook and
    refresh its batch. Safe to call any number of times, for any job."""
    session_factory = celery.session_factory
    with session_scope(session_factory) as session:
        job = session.get(Job, job_id)
        if job is None or job.status in OPEN_JOB_STATUSES:
            return
        delivery = queue_webhook(session, job.tenant_id, "job.completed", job.id, job.webhook_url)
        batch_id = job.batch_id
    if delivery is not None:
        _send(celery, DELIVER_WEBHOOK, delivery)
    if batch_id is not None:
        refresh_batch(session_factory, batch_id, celery)


def refresh_batch(session_factory, batch_id: str, celery=None) -> str | None:
    """Recount an open batch's members; move it on when none is queued or running.
    Returns the batch's status afterwards (None: no such batch)."""
    with session_scope(session_factory) as session:
        batch = session.get(Batch, batch_id, populate_existing=True)
        if batch is None or batch.status not in ("in_progress", "cancelling"):
            return None if batch is None else batch.status
        counts = member_counts(session, batch_id)
        done = not any(counts.get(status) for status in OPEN_JOB_STATUSES)
        status = batch.status
        if not done:
            session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == status)
                            .values(**count_columns(counts)).execution_options(synchronize_session=False))
            return status
        wanted = "finalizing" if status == "in_progress" else "cancelled"
        if not set_status(session, batch_id, status, wanted, **count_columns(counts)):
            return session.scalar(select(Batch.status).where(Batch.id == batch_id))  # another refresh moved it
        delivery = None
        if wanted == "cancelled":
            delivery = queue_webhook(session, batch.tenant_id, "batch.completed", batch_id, batch.webhook_url)
        merge = batch.merge
    if delivery is not None:
        _send(celery, DELIVER_WEBHOOK, delivery)
    if wanted == "finalizing":
        if merge:
            _send(celery, MERGE_BATCH, batch_id)
        else:
            complete_batch(session_factory, batch_id, celery)
            return "completed"
    return wanted


def complete_batch(session_factory, batch_id: str, celery=None) -> bool:
    """``finalizing -> completed``, with the final counts, and queue the batch's webhook.
    ``workers.merge.merge_batch`` calls it when its merge is done. False if the batch was
    not finalizing (completed already: a second call is harmless)."""
    with session_scope(session_factory) as session:
        batch = session.get(Batch, batch_id, populate_existing=True)
        if batch is None or batch.status != "finalizing":
            return False
        counts = count_columns(member_counts(session, batch_id))
        if not set_status(session, batch_id, "finalizing", "completed", **counts):
            return False
        delivery = queue_webhook(session, batch.tenant_id, "batch.completed", batch_id, batch.webhook_url)
    if delivery is not None:
        _send(celery, DELIVER_WEBHOOK, delivery)
    return True


def fail_batch(session_factory, batch_id: str, code: str, message: str, celery=None) -> bool:
    """End a batch that cannot be processed at all: ``failed`` with ``code``. Its members
    that have not started never will (failed with the same code); running ones are asked
    to stop. False if the batch had ended already."""
    from storage import lifecycle

    with session_scope(session_factory) as session:
        batch = session.get(Batch, batch_id, populate_existing=True)
        if batch is None or batch.status in BATCH_TERMINAL_STATUSES:
            return False
        for job in list(session.scalars(select(Job).where(Job.batch_id == batch_id,
                                                          Job.status.in_(OPEN_JOB_STATUSES)))):
            try:
                if job.status == "queued":
                    lifecycle.fail_unclaimed(session, job, code, message)
                else:
                    lifecycle.request_cancel(session, job.id)
            except lifecycle.IllegalTransition:
                pass  # it ended on its own meanwhile
        counts = count_columns(member_counts(session, batch_id))
        if not set_status(session, batch_id, batch.status, "failed", error_code=code, error_message=message,
                          **counts):
            return False
        delivery = queue_webhook(session, batch.tenant_id, "batch.completed", batch_id, batch.webhook_url)
    if delivery is not None:
        _send(celery, DELIVER_WEBHOOK, delivery)
    return True


def sweep(session_factory, celery=None, stale_seconds: float = 900.0, in_flight_seconds: float = 3900.0) -> dict:
    """Repair what lost notices left behind (for a periodic reconciler): refresh every open
    batch, send again the merge of a batch finalizing for over ``stale_seconds`` (its task
    may have been lost; ``merge_batch`` must be safe to run twice) unless a delivery of it
    started less than ``in_flight_seconds`` (the hard time limit) ago and has not ended
    (``workers.deliveries``), complete a finalizing unmerged batch, and send again each
    webhook delivery pending for over ``stale_seconds``. Returns what it did, by kind."""
    now = utcnow()
    stale = now - timedelta(seconds=stale_seconds)
    with session_scope(session_factory) as session:
        open_ids = list(session.scalars(select(Batch.id).where(Batch.status.in_(("in_progress", "cancelling")))))
        finalizing = list(session.execute(select(Batch.id, Batch.merge).where(
            Batch.status == "finalizing", Batch.updated_at < stale, not_in_flight(Batch, now, in_flight_seconds))))
        deliveries = list(session.scalars(select(WebhookDelivery.id).where(
            WebhookDelivery.status == "pending", WebhookDelivery.updated_at < stale)))
    done = {"refreshed": 0, "merges_resent": 0, "completed": 0, "webhooks_resent": 0}
    for batch_id in open_ids:
        refresh_batch(session_factory, batch_id, celery)
        done["refreshed"] += 1
    for batch_id, merge in finalizing:
        if merge:
            done["merges_resent"] += _send(celery, MERGE_BATCH, batch_id)
        else:
            done["completed"] += complete_batch(session_factory, batch_id, celery)
    for delivery_id in deliveries:
        done["webhooks_resent"] += _send(celery, DELIVER_WEBHOOK, delivery_id)
    return done
