"""The reconciler: every job the database still owes a run gets a message in the broker.

The database is the source of truth; the broker only carries ids, and messages get lost:
a worker killed with the embedded SQL broker takes its message with it; Redis loses
everything on FLUSHALL, or on a restart without its append-only file; and on Redis the
message of a worker that died comes back only after the visibility timeout (2 h by
default). Recovery must not wait for any of that, so ``reconcile_once`` looks at the
database and the broker and re-sends what is missing:

1. A **running job whose lease expired** (its worker died, or stalled past the lease) is
   re-sent, unless a message for it already waits in the broker. The worker that gets it
   takes the lease over (``storage.lifecycle.claim``), and fencing keeps the old worker,
   should it wake up, from writing anything. A job already claimed
   ``PALIMPSEST_JOB_MAX_ATTEMPTS`` times is failed instead (``worker_lost``), so a job that
   kills its worker cannot run forever. One whose cancel was requested ends ``cancelled``.
2. A **queued job** with no message in the broker, older than the grace period
   (``PALIMPSEST_RECONCILE_GRACE_SECONDS``; the API sends the message just after it
   commits the row), is re-sent.
3. A **statistic** that is pending or computing with no live lease (nor a shard under a
   live lease), unchanged for the grace period, with no message and no delivery under
   way (``workers.deliveries``), gets its ``compute_statistic`` again.
4. A **model** still ``pending`` after the grace period, with no message and no delivery
   under way, gets its ``inspect_model`` again (a message lost, a store outage that
   outlasted the worker's retries). Deliveries are capped: a checkpoint that kills its
   worker fails ``worker_lost`` (``workers.models.process_model``).
5. **Batches** are swept (``workers.batches.sweep``): open batches are recounted (and
   moved on when their last member ended but its notice was lost), a merge or webhook
   delivery whose task was lost is sent again.
6. **Expired jobs and batches** (``PALIMPSEST_RETENTION_SECONDS``, off by default) are deleted
   (``storage.deletion.expire``), as ``DELETE /v1/jobs/{id}`` and ``/v1/batches/{id}`` would.
7. **Deleted objects** are swept (``storage.deletion.sweep``): what deleted jobs, batches and
   models left in the store goes once ``PALIMPSEST_DELETION_GRACE_SECONDS`` have passed, and
   statistics of checkpoints that no row holds any more go with it.

A re-sent job gets a ``progress`` event (``reconciler: re-sent ...``), and is not re-sent
again within the grace period. A re-send that turns out to be a duplicate is harmless:
every task claims before it works, and a second claim of a job finds it running or done.

The broker is read with ``broker_messages``: on Redis, the queues' lists (every priority)
and the deliveries not yet acknowledged that are younger than the grace period (a worker
claims its job within milliseconds of delivery, so an older one belongs to a dead worker);
on the embedded SQL broker, the messages not yet delivered. Other brokers cannot be
listed: there only expired leases are re-sent, and queued jobs only when asked
(``palimpsest reconcile --all-queued``).

One function, two callers: the periodic task ``workers.reconcile.reconcile`` (queue
``cpu``, sent by the beat every ``PALIMPSEST_RECONCILE_INTERVAL_SECONDS``; run the beat
with ``palimpsest worker --beat`` or ``palimpsest beat``) and ``palimpsest reconcile``.
"""
import base64
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery import shared_task
from sqlalchemy import select

from storage import deletion, lifecycle
from storage.db import session_scope
from storage.models import Job, JobEvent, Model, Statistic, StatisticShard, utcnow
from storage.objects import StorageError
from workers.batches import job_ended, sweep
from workers.celery_app import broker_priority
from workers.deliveries import not_in_flight
from workers.statistics import unheld

log = logging.getLogger(__name__)

RUN_JOB = "workers.jobs.run_job"
COMPUTE_STATISTIC = "workers.statistics.compute_statistic"
INSPECT_MODEL = "workers.models.inspect_model"
RESENT = "reconciler: re-sent"  # the start of a re-send event's message
IN_CHUNK = 500  # ids per IN (...) query
JOB_COLUMNS = (Job.id, Job.status, Job.phase, Job.priority, Job.attempts, Job.lease_owner, Job.lease_expires_at,
               Job.fencing_token, Job.cancel_requested)


@dataclass
class Report:
    """What one pass did."""

    resent_jobs: list = field(default_factory=list)
    failed_jobs: list = field(default_factory=list)  # given up after max attempts (worker_lost)
    cancelled_jobs: list = field(default_factory=list)  # cancel requested, then their worker died
    resent_statistics: list = field(default_factory=list)
    resent_models: list = field(default_factory=list)
    batches: dict = field(default_factory=dict)  # what workers.batches.sweep did, by kind
    expired: dict = field(default_factory=dict)  # what storage.deletion.expire deleted
    deleted: dict = field(default_factory=dict)  # what storage.deletion.sweep did
    broker_listed: bool = True  # False: the broker cannot be listed (queued jobs left alone)

    @property
    def batch_repairs(self) -> dict:
        """What the sweep repaired (a routine recount of an open batch is not a repair)."""
        return {kind: n for kind, n in self.batches.items() if n and kind != "refreshed"}

    @property
    def swept(self) -> bool:
        """Whether the deleted-object sweep removed anything (objects kept are routine)."""
        return bool(self.deleted.get("objects") or self.deleted.get("statistics"))

    @property
    def aged_out(self) -> bool:
        """Whether retention deleted any job or batch."""
        return any(self.expired.values())

    @property
    def acted(self) -> bool:
        return bool(self.resent_jobs or self.failed_jobs or self.cancelled_jobs or self.resent_statistics
                    or self.resent_models or self.batch_repairs or self.aged_out or self.swept)

    def __str__(self):
        repaired = ", ".join(f"{kind} {n}" for kind, n in self.batch_repairs.items())
        return (f"re-sent {len(self.resent_jobs)} jobs, {len(self.resent_statistics)} statistics and "
                f"{len(self.resent_models)} models; failed {len(self.failed_jobs)} jobs after too many attempts; "
                f"cancelled {len(self.cancelled_jobs)} abandoned jobs"
                + (f"; batches: {repaired}" if repaired else "")
                + (f"; expired {self.expired['jobs']} jobs and {self.expired['batches']} batches"
                   if self.aged_out else "")
                + (f"; deleted {self.deleted['objects']} objects and {self.deleted['statistics']} statistics"
                   if self.swept else "")
                + ("" if self.broker_listed else " (the broker cannot be listed: queued jobs were not checked)"))


# --- the broker ----------------------------------------------------------------------------

def _task_and_id(payload: dict) -> tuple[str | None, str | None]:
    """(task name, first argument) of a Celery message (protocol 2), or (None, None)."""
    try:
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return payload["headers"]["task"], (args[0] if args else None)
    except (KeyError, IndexError, TypeError, ValueError):
        return None, None


def _redis_payloads(channel, queues, delivered_after: datetime) -> list[dict]:
    client = channel.client
    keys = sorted({channel._q_for_pri(queue, priority) for queue in queues for priority in channel.priority_steps})
    with client.pipeline() as pipe:
        for key in keys:
            pipe.lrange(key, 0, -1)
        waiting = [json.loads(raw) for found in pipe.execute() for raw in found]
    tags = client.zrangebyscore(channel.unacked_index_key, delivered_after.timestamp(), "+inf")
    delivered = [json.loads(raw)[0] for raw in (client.hmget(channel.unacked_key, tags) if tags else []) if raw]
    return waiting + delivered


def _sql_payloads(channel, queues) -> list[dict]:
    payloads = []
    for queue in queues:
        rows = channel._query_all(queue).filter(channel.message_cls.visible.is_(True))
        payloads += [json.loads(row.payload) for row in rows]
    channel.session.commit()  # end the read transaction: SQLite would keep its snapshot
    return payloads


def broker_messages(celery, delivered_after: datetime) -> dict | None:
    """{task name: {first argument}} of the messages the broker holds for workers, or None
    when this broker cannot be listed."""
    queues = [queue.name for queue in celery.conf.task_queues]
    with celery.connection_for_write() as connection:
        channel = connection.default_channel
        kind = connection.transport.driver_type
        if kind == "redis":
            payloads = _redis_payloads(channel, queues, delivered_after)
        elif kind == "sql":
            payloads = _sql_payloads(channel, queues)
        else:
            return None
    found = defaultdict(set)
    for payload in payloads:
        task, object_id = _task_and_id(payload)
        if task is not None:
            found[task].add(object_id)
    return found


# --- one pass ------------------------------------------------------------------------------

def _chunks(ids):
    ids = list(ids)
    return (ids[i:i + IN_CHUNK] for i in range(0, len(ids), IN_CHUNK))


def _recently_resent(session, job_ids, since: datetime) -> set:
    recent = set()
    for chunk in _chunks(job_ids):
        recent.update(session.scalars(select(JobEvent.job_id).where(
            JobEvent.job_id.in_(chunk), JobEvent.kind == "progress", JobEvent.created_at > since,
            JobEvent.message.like(f"{RESENT}%")).distinct()))
    return recent


def _statistics_to_resend(session, now: datetime, grace: timedelta, hard_limit_s: float) -> list[str]:
    """Pending or computing statistics that nobody holds a live lease on, unchanged for ``grace``,
    with no ``compute_statistic`` delivery under way."""
    stale = [Statistic.status.in_(("pending", "computing")), Statistic.updated_at <= now - grace,
             unheld(Statistic, now),
             not_in_flight(Statistic, now, hard_limit_s)]
    ids = list(session.scalars(select(Statistic.id).where(*stale)))
    if ids:  # sharded statistics: also no shard under a live lease
        held = set()
        for chunk in _chunks(ids):
            held.update(session.scalars(select(StatisticShard.statistic_id).where(
                StatisticShard.statistic_id.in_(chunk), StatisticShard.status == "computing",
                StatisticShard.lease_expires_at > now)))
        ids = [i for i in ids if i not in held]
    return ids


def reconcile_once(session_factory, celery, settings, *, all_queued: bool = False,
                   now: datetime | None = None) -> Report:
    """One pass (see the module doc). ``all_queued``: re-send queued jobs even when the
    broker cannot be listed (the operator knows its messages were lost)."""
    now = now or utcnow()
    grace = timedelta(seconds=settings.reconcile_grace_seconds)
    waiting = broker_messages(celery, delivered_after=now - grace)
    report = Report(broker_listed=waiting is not None)
    in_broker = (lambda task, object_id: waiting is not None and object_id in waiting.get(task, ()))

    with session_scope(session_factory) as session:
        expired = session.execute(select(*JOB_COLUMNS).where(Job.status == "running",
                                                             Job.lease_expires_at <= now)).all()
        queued, models = [], []
        if waiting is not None or all_queued:  # (a long queue is normal: only the columns needed)
            queued = session.execute(select(*JOB_COLUMNS).where(Job.status == "queued",
                                                                Job.created_at <= now - grace)).all()
            models = list(session.scalars(select(Model.id).where(
                Model.status == "pending", Model.created_at <= now - grace,
                not_in_flight(Model, now, settings.task_time_limit))))
        statistics = _statistics_to_resend(session, now, grace, settings.task_time_limit)
        candidates = [job for job in expired + queued if not in_broker(RUN_JOB, job.id)]
        recent = _recently_resent(session, [job.id for job in candidates], now - grace)

    resend = []
    for job in candidates:
        if job.status == "running" and job.cancel_requested:
            with session_scope(session_factory) as session:
                cancelled = lifecycle.cancel_abandoned(session, job, now)
            if cancelled:
                report.cancelled_jobs.append(job.id)
                job_ended(celery, job.id)
        elif job.status == "running" and job.attempts >= settings.job_max_attempts:
            with session_scope(session_factory) as session:
                failed = lifecycle.give_up(session, job, settings.job_max_attempts, now)
            if failed:
                report.failed_jobs.append(job.id)
                job_ended(celery, job.id)  # its webhook, its batch's counts (workers/batches.py)
        elif job.id not in recent:
            resend.append(job)
    for chunk in _chunks(resend):  # after FLUSHALL, thousands: one transaction and one producer per chunk
        with session_scope(session_factory) as session:
            for job in chunk:
                reason = (f"lease of {job.lease_owner} expired at {job.lease_expires_at:%H:%M:%S}"
                          if job.status == "running" else "queued with no message in the broker")
                lifecycle.lock(session, job.id)  # a worker may be writing its own event
                lifecycle.add_event(session, job.id, "progress", status=job.status, phase=job.phase,
                                    message=f"{RESENT} ({reason})")
        with celery.producer_pool.acquire(block=True) as producer:
            for job in chunk:
                celery.send_task(RUN_JOB, args=[job.id], priority=broker_priority(job.priority), producer=producer)
                report.resent_jobs.append(job.id)

    for statistic_id in statistics:
        if not in_broker(COMPUTE_STATISTIC, statistic_id):
            celery.send_task(COMPUTE_STATISTIC, args=[statistic_id])
            report.resent_statistics.append(statistic_id)
    for model_id in models:
        if not in_broker(INSPECT_MODEL, model_id):
            celery.send_task(INSPECT_MODEL, args=[model_id])
            report.resent_models.append(model_id)
    report.batches = sweep(session_factory, celery, in_flight_seconds=settings.task_time_limit)
    if settings.retention_seconds:  # before the sweep: what expires now is recorded for a later one
        report.expired = deletion.expire(session_factory, settings.retention_seconds, now)
    try:
        report.deleted = deletion.sweep(session_factory, celery.store, settings.deletion_grace_seconds, now)
    except StorageError:
        log.exception("reconcile: the store is away; deleted objects wait for the next pass")
    if report.acted:
        log.warning("reconcile: %s", report)
    return report


# --- the periodic task -----------------------------------------------------------------------

@shared_task(bind=True, name="workers.reconcile.reconcile")
def reconcile(self) -> str:
    """One reconciler pass (queue ``cpu``); the beat sends it every ``reconcile_interval_seconds``."""
    return str(reconcile_once(self.app.session_factory, self.app, self.app.settings))
