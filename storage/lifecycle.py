"""A job's lifecycle: the one place that moves a job between states.

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled | failed
    running -> queued          (``release``: its worker was stopping and handed it back)

Every change is a compare-and-set ``UPDATE ... WHERE`` on the row (status, and for a
worker its ``fencing_token``), written in the caller's transaction together with the
event that records it, so the row and its history never disagree. The caller commits;
keep these transactions short (see ``storage.db``).

Leases: a worker runs a job only while it holds a lease, granted by ``claim``. Each
grant increments ``fencing_token``; every later write of that worker names the token,
so once a lease has expired and another worker has claimed the job, the first worker's
writes match no row and raise ``LeaseLost``. A late duplicate cannot overwrite a
finished job.

A job handed back may name its optimizer's state (``resume_object_key``), for the next
claim to go on from; every ending drops it (``_drop_resume``): the object is recorded for
the sweep (``storage.deletion``). Only a release changes the key, and a release ends the
lease, so the key a claim read (``Lease.resume_key``) holds until the lease ends: the
worker's own ending needs no read.
"""
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.deletion import record_deleted
from storage.models import JOB_PHASES, JOB_TERMINAL_STATUSES, Job, JobEvent, new_id, utcnow

ALLOWED = {
    "queued": {"running", "cancelled", "failed"},
    "running": {"queued", "succeeded", "failed", "cancelled"},
    "succeeded": set(),
    "failed": set(),
    "cancelled": set(),
}


class IllegalTransition(Exception):
    """The job is not in a state from which the asked-for change is allowed."""

    def __init__(self, job_id: str, current: str, wanted: str):
        super().__init__(f"job {job_id} is {current}; it cannot become {wanted}")
        self.job_id, self.current, self.wanted = job_id, current, wanted


class LeaseLost(Exception):
    """This worker's lease was taken over, or the job ended: stop and write nothing."""


@dataclass(frozen=True)
class Lease:
    job_id: str
    owner: str
    token: int
    resume_key: str | None = None  # the job's resume_object_key when it was claimed


def lock(session: Session, job_id: str) -> None:
    """Lock the job's row for the rest of the transaction (a no-op UPDATE: SQLite has no
    ``SELECT ... FOR UPDATE``), before ``add_event`` by a caller that changes nothing else."""
    session.execute(update(Job).where(Job.id == job_id).values(fencing_token=Job.fencing_token)
                    .execution_options(synchronize_session=False))


def add_event(session: Session, job_id: str, kind: str, seq: int | None = None, **fields) -> JobEvent:
    """Append an event; ``seq`` orders a job's events (the next one unless given).

    The caller holds the job's row lock (it updated the row in this transaction, or called
    ``lock``), so that two writers cannot both take the same next ``seq``."""
    if seq is None:
        seq = session.scalar(select(func.coalesce(func.max(JobEvent.seq), 0)).where(JobEvent.job_id == job_id)) + 1
    event = JobEvent(job_id=job_id, seq=seq, kind=kind, **fields)
    session.add(event)
    session.flush()
    return event


def create_job(session: Session, **columns) -> Job:
    """Insert a queued job and its first event. The caller commits, then sends the task."""
    job = Job(**{"id": new_id("job"), **columns}, status="queued")
    session.add(job)
    # A new job has no events: seq 1 without a SELECT, and one flush writes both rows.
    add_event(session, job.id, "transition", seq=1, status="queued")
    return job


def _check(job_id: str, current: str, wanted: str) -> None:
    if wanted not in ALLOWED[current]:
        raise IllegalTransition(job_id, current, wanted)


def _compare_and_set(session: Session, job_id: str, where: dict, values: dict) -> bool:
    conditions = [Job.id == job_id] + [getattr(Job, k) == v for k, v in where.items()]
    result = session.execute(update(Job).where(*conditions).values(**values).execution_options(synchronize_session=False))
    return result.rowcount == 1


def claim(session: Session, job_id: str, owner: str, ttl: float, now: datetime | None = None,
          max_attempts: int | None = None) -> Lease | None:
    """Grant ``owner`` a lease on the job, or return None when it must not run here.

    A queued job becomes running. A running job whose lease has expired (its worker
    died) is taken over, unless it was already claimed ``max_attempts`` times: then it
    fails (``worker_lost``) instead of running again. A running job with a live lease (a
    duplicate delivery) and a finished job are left alone. A queued job whose cancel was
    requested becomes cancelled instead of running, and so does a running one whose lease
    expired after its cancel was requested.
    """
    now = now or utcnow()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status in JOB_TERMINAL_STATUSES:
        return None
    if job.status == "queued" and job.cancel_requested:
        cancel_queued(session, job)
        return None
    if job.status == "running" and job.lease_expires_at is not None and job.lease_expires_at > now:
        return None
    if job.status == "running" and job.cancel_requested:
        cancel_abandoned(session, job, now)  # its worker died after the cancel: do not run it again
        return None
    if job.status == "running" and max_attempts is not None and job.attempts >= max_attempts:
        give_up(session, job, max_attempts, now)
        return None

    token = job.fencing_token + 1
    values = dict(
        status="running", phase="loading", fencing_token=token, lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=ttl), heartbeat_at=now, attempts=job.attempts + 1,
        started_at=job.started_at or now,
    )
    if not _compare_and_set(session, job_id, {"status": job.status, "fencing_token": job.fencing_token}, values):
        return None  # another worker claimed it first
    if job.status == "queued":
        add_event(session, job_id, "transition", status="running", phase="loading", message=f"claimed by {owner}")
    else:
        add_event(session, job_id, "transition", status="running", phase="loading",
                  message=f"lease of {job.lease_owner} expired; taken over by {owner}")
    return Lease(job_id, owner, token, job.resume_object_key)


def heartbeat(session: Session, lease: Lease, ttl: float, now: datetime | None = None) -> bool:
    """Extend the lease; returns whether a cancel was requested. Raises ``LeaseLost``."""
    now = now or utcnow()
    values = dict(lease_expires_at=now + timedelta(seconds=ttl), heartbeat_at=now)
    if not _compare_and_set(session, lease.job_id, {"status": "running", "fencing_token": lease.token}, values):
        raise LeaseLost(lease.job_id)
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == lease.job_id)))


def report_progress(session: Session, lease: Lease, phase: str, step: int | None = None,
                    total: int | None = None, loss: float | None = None, milestone: bool = False) -> None:
    """Write progress on the row; a milestone (a new phase, say) is also kept as an event.

    Callers bound the rate (the row is rewritten at most every few seconds)."""
    if phase not in JOB_PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    values = dict(phase=phase, progress_step=step, progress_total=total, progress_loss=loss)
    if not _compare_and_set(session, lease.job_id, {"status": "running", "fencing_token": lease.token}, values):
        raise LeaseLost(lease.job_id)
    if milestone:
        add_event(session, lease.job_id, "progress", status="running", phase=phase, step=step, total=total, loss=loss)


def finish(session: Session, lease: Lease, status: str, *, error_code: str | None = None,
           error_message: str | None = None, metrics: dict | None = None, now: datetime | None = None) -> None:
    """End a running job the lease holder ran: succeeded, failed or cancelled."""
    if status not in JOB_TERMINAL_STATUSES:  # back to the queue is ``release``
        raise IllegalTransition(lease.job_id, "running", status)
    _check(lease.job_id, "running", status)
    now = now or utcnow()
    values = dict(status=status, finished_at=now, lease_owner=None, lease_expires_at=None,
                  error_code=error_code, error_message=error_message)
    if metrics is not None:
        values["metrics"] = metrics
    if not _compare_and_set(session, lease.job_id, {"status": "running", "fencing_token": lease.token}, values):
        raise LeaseLost(lease.job_id)
    _drop_resume(session, lease.job_id, lease.resume_key)
    add_event(session, lease.job_id, "transition", status=status,
              message=f"{error_code}: {error_message}" if error_code else None)


def release(session: Session, lease: Lease, reason: str, resume=None) -> None:
    """Hand a running job back to the queue: its worker is stopping (a deploy) and will not
    end it. The lease is cleared, so the next delivery claims the job at once instead of
    waiting for the lease to expire; the claim takes a new fencing token, and this lease's
    writes match no row from now on (the job is no longer running). The claim is given
    back too (``attempts``): an orderly hand-back is not a worker death, so it does not
    count towards ``max_attempts``. ``resume``: the stored object (``key``, ``sha256``) of
    where its optimizer stood, replacing any the job named (None keeps that one: a job
    handed back before it optimized again still goes on from its last state). Raises
    ``LeaseLost`` when the job is no longer ours. The caller sends the task again once
    this is committed."""
    _check(lease.job_id, "running", "queued")
    values = dict(status="queued", phase=None, progress_step=None, progress_total=None, progress_loss=None,
                  lease_owner=None, lease_expires_at=None, heartbeat_at=None, attempts=Job.attempts - 1)
    if resume is not None:
        values.update(resume_object_key=resume.key, resume_sha256=resume.sha256)
    if not _compare_and_set(session, lease.job_id, {"status": "running", "fencing_token": lease.token}, values):
        raise LeaseLost(lease.job_id)
    if resume is not None and lease.resume_key not in (None, resume.key):
        record_deleted(session, [lease.resume_key])
    add_event(session, lease.job_id, "transition", status="queued", message=f"released by {lease.owner}: {reason}")


def fail_abandoned(session: Session, job_id: str, error_code: str, error_message: str, *,
                   owner: str | None = None, token: int | None = None, now: datetime | None = None) -> bool:
    """Fail a running job whose worker can no longer end it, without holding its lease.

    With ``owner``: the job must still be that worker's (the worker's parent process saw it
    killed at the hard time limit). With ``token``: the lease granted with that token must
    have expired (the reconciler, or a claim, giving up on a job whose workers keep dying).
    False when the job changed meanwhile (it ended, or another worker holds it now)."""
    now = now or utcnow()
    conditions = []
    if owner is not None:
        conditions.append(Job.lease_owner == owner)
    if token is not None:
        conditions += [Job.fencing_token == token, Job.lease_expires_at <= now]
    if not conditions:
        raise ValueError("fail_abandoned needs the owner or the token of the lease it ends")
    return _end_abandoned(session, job_id, "failed", conditions, now, f"{error_code}: {error_message}",
                          error_code=error_code, error_message=error_message)


def _end_abandoned(session: Session, job_id: str, status: str, conditions: list, now: datetime, message: str,
                   **columns) -> bool:
    """End a running job meeting ``conditions`` without its lease; False when it changed meanwhile."""
    values = dict(status=status, finished_at=now, lease_owner=None, lease_expires_at=None, **columns)
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == "running", *conditions)
                             .values(**values).execution_options(synchronize_session=False))
    if result.rowcount != 1:
        return False
    # no lease or row in hand (the hard time limit, the reconciler): read the key; it ends a
    # job whose worker died, which is rare
    _drop_resume(session, job_id, session.scalar(select(Job.resume_object_key).where(Job.id == job_id)))
    add_event(session, job_id, "transition", status=status, message=message)
    return True


def _drop_resume(session: Session, job_id: str, key: str | None) -> None:
    """A job that ended needs no optimizer state: record its object (``key``, what the job
    names) for the sweep."""
    if key is not None:
        record_deleted(session, [key])
        session.execute(update(Job).where(Job.id == job_id).values(resume_object_key=None, resume_sha256=None)
                        .execution_options(synchronize_session=False))


def give_up(session: Session, job: Job, max_attempts: int, now: datetime | None = None) -> bool:
    """Fail a running job whose lease expired after ``max_attempts`` claims (``worker_lost``)."""
    return fail_abandoned(session, job.id, "worker_lost",
                          f"its worker stopped without ending it {job.attempts} times "
                          f"(lease of {job.lease_owner} expired; at most {max_attempts} attempts)",
                          token=job.fencing_token, now=now)


def cancel_abandoned(session: Session, job: Job, now: datetime | None = None) -> bool:
    """End ``cancelled`` a running job whose cancel was requested and whose worker died (the
    lease granted with its current token expired); False when it changed meanwhile."""
    now = now or utcnow()
    return _end_abandoned(session, job.id, "cancelled",
                          [Job.fencing_token == job.fencing_token, Job.lease_expires_at <= now,
                           Job.cancel_requested.is_(True)],
                          now, f"cancelled; lease of {job.lease_owner} expired before it stopped")


def fail_unclaimed(session: Session, job: Job, error_code: str, error_message: str) -> None:
    """Fail a queued job that can never run (its model vanished, say), without a lease."""
    _check(job.id, job.status, "failed")
    values = dict(status="failed", finished_at=utcnow(), error_code=error_code, error_message=error_message)
    if not _compare_and_set(session, job.id, {"status": "queued", "fencing_token": job.fencing_token}, values):
        raise IllegalTransition(job.id, "changed", "failed")
    _drop_resume(session, job.id, job.resume_object_key)  # the compare-and-set saw this row unchanged
    add_event(session, job.id, "transition", status="failed", message=f"{error_code}: {error_message}")


def cancel_queued(session: Session, job: Job) -> None:
    values = dict(status="cancelled", finished_at=utcnow(), cancel_requested=True)
    if not _compare_and_set(session, job.id, {"status": "queued", "fencing_token": job.fencing_token}, values):
        raise IllegalTransition(job.id, "changed", "cancelled")
    _drop_resume(session, job.id, job.resume_object_key)
    add_event(session, job.id, "transition", status="cancelled", message="cancelled before it ran")


def request_cancel(session: Session, job_id: str) -> Job:
    """Cancel a job: a queued one never runs; a running one stops at its next step
    (its worker sees ``cancel_requested`` at the next heartbeat or progress check and
    calls ``finish(..., "cancelled")``). A finished job raises ``IllegalTransition``."""
    for _ in range(3):  # the job may change under us (claimed, finished); re-read and retry
        job = session.get(Job, job_id, populate_existing=True)
        if job.status in JOB_TERMINAL_STATUSES:
            raise IllegalTransition(job_id, job.status, "cancelled")
        if job.status == "queued":
            try:
                cancel_queued(session, job)
                break
            except IllegalTransition:
                continue
        if _compare_and_set(session, job_id, {"status": "running"}, {"cancel_requested": True}):
            if not job.cancel_requested:
                add_event(session, job_id, "progress", status="running", phase=job.phase, message="cancel requested")
            break
    return session.get(Job, job_id, populate_existing=True)
