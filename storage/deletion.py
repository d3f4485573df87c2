"""Deleting jobs, batches and models, and sweeping the objects they leave behind.

Rows go at once, in the caller's transaction; objects go later. Keys are content-addressed
(``storage.objects.content_key``), so one object can belong to several rows, and a worker may
be writing the same bytes for another job while a row that named them is deleted. So a delete
only records the keys its rows named (``DeletedObject``), and ``sweep`` deletes an object once
its record is older than the grace period and no row names the key.

Two writers meet at a record, and the record's row lock orders them:
- a worker about to put an object first deletes the key's record (``revive``), in a
  transaction of its own, then puts the object, then inserts its rows;
- ``sweep`` deletes the records it acts on first, then deletes the objects, then commits.
A worker that revives a key the sweep holds waits for the sweep's commit and puts the object
again after it; one that revived first left no record to sweep. A record made after a
worker's put (another row with that key deleted meanwhile) waits the grace period, by which
time the worker's row names the key: keep the grace well above a worker's longest wait between
its upload and its commit (its store and database retries, minutes at most by default).

What may be deleted (the API turns the exceptions into 409s):
- a job once it has ended (``succeeded``, ``failed``, ``cancelled``), unless it belongs to a
  batch (delete the batch) or another job starts from its checkpoint (``base_job_id``);
- a batch once it has ended (``completed``, ``failed``, ``cancelled``), with its members and
  merges, unless a job outside it starts from one of its members;
- a model no job or merge names, with its checkpoint and segmenter objects (whether the API
  wrote them or the tenant registered a key of its own: deleting a model deletes its weights).

With ``PALIMPSEST_RETENTION_SECONDS`` set, ``expire`` deletes the jobs and batches that ended
longer ago than that, as the API's DELETE would: a job goes after the jobs chained on it, and
one that a live job or a younger batch still starts from waits for them.

Statistics are shared by checkpoint hash, not owned; ``sweep`` also removes a ready or failed
statistic, with its shards, once no model, checkpoint artifact or merge has that hash (they
are derived from the weights, so they go with the last copy of them).
"""
import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, or_, select, union_all
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import (
    BATCH_TERMINAL_STATUSES,
    JOB_TERMINAL_STATUSES,
    Artifact,
    Batch,
    BatchMerge,
    DeletedObject,
    Job,
    Model,
    Statistic,
    StatisticShard,
    WebhookDelivery,
    utcnow,
)

log = logging.getLogger(__name__)

SWEEP_LIMIT = 1000  # statistics a sweep looks at; the next sweep takes the rest
SWEEP_CHUNK = 100  # records locked at a time while their objects are deleted
RECORD_CHUNK = 1000  # keys an INSERT records: a batch's 40,000 would pass the databases' bind limits
SAMPLE_IDS = 5  # dependents named in a refusal
EXPIRE_LIMIT = 1000  # jobs (and batches) one expiry pass deletes; the next pass takes the rest
EXPIRE_CHUNK = 100  # deleted per transaction: row locks held briefly, a lost race costs little


class NotFinished(Exception):
    """The job or batch is still queued or running: cancel it first."""


class InUse(Exception):
    """Other rows depend on this one; the message names them."""


def _ids(ids) -> str:
    ids = list(ids)
    more = f" and {len(ids) - SAMPLE_IDS} more" if len(ids) > SAMPLE_IDS else ""
    return ", ".join(ids[:SAMPLE_IDS]) + more


def record_deleted(session: Session, keys, now: datetime | None = None) -> None:
    """Record ``keys`` for the sweep; a key recorded before starts its grace again."""
    keys = sorted({key for key in keys if key})
    if not keys:
        return
    insert = (postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert)(DeletedObject)
    now = now or utcnow()
    for start in range(0, len(keys), RECORD_CHUNK):
        statement = insert.values([{"object_key": key, "deleted_at": now} for key in keys[start:start + RECORD_CHUNK]])
        session.execute(statement.on_conflict_do_update(index_elements=["object_key"],
                                                        set_={"deleted_at": statement.excluded.deleted_at}))


def _delete_jobs(session: Session, where) -> None:
    """The ended jobs ``where`` selects: their artifacts' keys recorded, their webhook notices
    dropped, the rows deleted (events and artifact rows go by cascade)."""
    ids = select(Job.id).where(where)
    record_deleted(session, session.scalars(select(Artifact.object_key).where(Artifact.job_id.in_(ids))))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.subject_id.in_(ids)))
    session.execute(delete(Job).where(where))


def delete_job(session: Session, job: Job) -> None:
    """Delete an ended job that neither a batch nor another job depends on. The caller commits
    (an ``IntegrityError`` then means a job naming it as its base was submitted meanwhile)."""
    if job.status not in JOB_TERMINAL_STATUSES:
        raise NotFinished(f"job {job.id} is {job.status}; cancel it (POST /v1/jobs/{job.id}/cancel) "
                          "and delete it once it has ended")
    if job.batch_id is not None:
        raise InUse(f"job {job.id} belongs to batch {job.batch_id}; delete the batch instead")
    chained = list(session.scalars(select(Job.id).where(Job.base_job_id == job.id).order_by(Job.id)))
    if chained:
        raise InUse(f"job {job.id} is the base of {_ids(chained)}; delete those first")
    _delete_jobs(session, Job.id == job.id)


def delete_batch(session: Session, batch: Batch) -> None:
    """Delete an ended batch with its members, their artifacts and its merges."""
    if batch.status not in BATCH_TERMINAL_STATUSES:
        raise NotFinished(f"batch {batch.id} is {batch.status}; cancel it (POST /v1/batches/{batch.id}/cancel) "
                          "and delete it once it has ended")
    members = select(Job.id).where(Job.batch_id == batch.id)
    outside = list(session.scalars(select(Job.id).where(Job.base_job_id.in_(members),
                                                        Job.batch_id.is_distinct_from(batch.id)).order_by(Job.id)))
    if outside:
        raise InUse(f"jobs of batch {batch.id} are the base of {_ids(outside)}; delete those first")
    merges = session.execute(select(BatchMerge.delta_object_key, BatchMerge.checkpoint_object_key,
                                    BatchMerge.report_object_key).where(BatchMerge.batch_id == batch.id)).all()
    record_deleted(session, [batch.input_object_key, batch.output_object_key, batch.resume_object_key,
                             *(k for row in merges for k in row)])
    # one statement: a member chained on another member goes with it (the foreign key is
    # checked at the statement's end, on PostgreSQL and SQLite alike)
    _delete_jobs(session, Job.batch_id == batch.id)
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.subject_id == batch.id))
    session.execute(delete(Batch).where(Batch.id == batch.id))  # merges go by cascade


def delete_model(session: Session, model: Model) -> None:
    """Delete a tenant's model that no job or merge names."""
    jobs = session.scalar(select(Job.id).where(Job.model_id == model.id).limit(1))
    merges = session.scalar(select(BatchMerge.id).where(BatchMerge.model_id == model.id).limit(1))
    if jobs is not None or merges is not None:
        raise InUse(f"model {model.id} has jobs (GET /v1/jobs?model={model.id}) or batch merges; "
                    "delete them (or their batches) first")
    record_deleted(session, [model.object_key, model.segmenter_object_key])
    session.execute(delete(Model).where(Model.id == model.id))


def expire(session_factory, retention_seconds: float, now: datetime | None = None) -> dict:
    """Delete standalone jobs, then batches, that ended more than ``retention_seconds`` before
    ``now``, at most ``EXPIRE_LIMIT`` of each. Returns the counts.

    Jobs go leaves first: a job that another job starts from (``base_job_id``) waits until that
    one has gone, in a later round of the same pass if it has expired too. A batch whose member
    a job outside it starts from waits likewise. A submission naming a job as its base just as
    it is deleted makes the chunk's commit fail on the foreign key: it is logged and retried
    next pass (the API answers the submission 422 when the delete wins)."""
    from sqlalchemy.exc import IntegrityError

    from storage.db import session_scope  # storage.db imports the models, not this module

    now = now or utcnow()
    cutoff = now - timedelta(seconds=retention_seconds)
    counts = {"jobs": 0, "batches": 0}
    child = Job.__table__.alias("child")
    expired = select(Job.id).where(Job.status.in_(JOB_TERMINAL_STATUSES), Job.batch_id.is_(None),
                                   Job.finished_at <= cutoff, ~exists().where(child.c.base_job_id == Job.id))
    while counts["jobs"] < EXPIRE_LIMIT:
        try:
            with session_scope(session_factory) as session:
                leaves = list(session.scalars(expired.limit(EXPIRE_CHUNK)))
                if leaves:
                    _delete_jobs(session, Job.id.in_(leaves))
        except IntegrityError:
            log.warning("expire: a job was submitted on an expired job; the next pass tries again")
            break
        if not leaves:
            break
        counts["jobs"] += len(leaves)
    # a batch whose member a job outside it starts from waits for that job; left out of the
    # query, so that many such batches cannot take every place in the pass from younger ones
    member, outside = Job.__table__.alias("member"), Job.__table__.alias("outside")
    held = exists().where(member.c.batch_id == Batch.id, outside.c.base_job_id == member.c.id,
                          outside.c.batch_id.is_distinct_from(Batch.id))
    with session_scope(session_factory) as session:
        batch_ids = list(session.scalars(select(Batch.id).where(
            Batch.status.in_(BATCH_TERMINAL_STATUSES), Batch.finished_at <= cutoff, ~held)
            .order_by(Batch.finished_at).limit(EXPIRE_LIMIT)))
    for batch_id in batch_ids:
        try:
            with session_scope(session_factory) as session:
                batch = session.get(Batch, batch_id)
                if batch is not None:
                    delete_batch(session, batch)
                    counts["batches"] += 1
        except (InUse, IntegrityError):
            continue  # held since the query: a job outside it was submitted on a member
    return counts


def _named_keys(session: Session, keys: list[str]) -> set[str]:
    """Those of ``keys`` that some row names."""
    columns = (Model.object_key, Model.segmenter_object_key, Artifact.object_key, Job.resume_object_key,
               Statistic.object_key, Statistic.resume_object_key, StatisticShard.object_key,
               StatisticShard.resume_object_key, Batch.input_object_key, Batch.output_object_key,
               Batch.resume_object_key,
               BatchMerge.delta_object_key, BatchMerge.checkpoint_object_key, BatchMerge.report_object_key)
    return set(session.scalars(union_all(*(select(column).where(column.in_(keys)) for column in columns))))


def _orphaned_statistics(session: Session, before: datetime) -> list[str]:
    """Ready or failed statistics, unchanged since ``before``, of a hash no row holds any more."""
    # one indexed probe per statistic (models.sha256, artifacts.sha256): the reconciler runs
    # this every pass, and a NOT IN over every artifact would read the whole table each time
    sha = Statistic.model_sha256
    held = or_(exists().where(Model.sha256 == sha),
               exists().where(Artifact.sha256 == sha, Artifact.name == "checkpoint"),
               exists().where(or_(BatchMerge.checkpoint_sha256 == sha, BatchMerge.model_sha256 == sha)))
    return list(session.scalars(select(Statistic.id).where(
        Statistic.status.in_(("ready", "failed")), Statistic.updated_at <= before, ~held).limit(SWEEP_LIMIT)))


def revive(session: Session, key: str) -> None:
    """Before a worker puts ``key``: drop its record, so that no sweep deletes the object
    (waits while a sweep holds the record; see the module doc). Commit before the put."""
    session.execute(delete(DeletedObject).where(DeletedObject.object_key == key))


def sweep(session_factory, store, grace_seconds: float, now: datetime | None = None) -> dict:
    """One pass: orphaned statistics are recorded, then objects whose record is older than the
    grace and whose key no row names are deleted from the store. Returns the counts."""
    from storage.db import session_scope  # storage.db imports the models, not this module

    now = now or utcnow()
    before = now - timedelta(seconds=grace_seconds)
    with session_scope(session_factory) as session:
        orphans = _orphaned_statistics(session, before)
        if orphans:
            keys = session.scalars(union_all(
                select(Statistic.object_key).where(Statistic.id.in_(orphans)),
                select(Statistic.resume_object_key).where(Statistic.id.in_(orphans)),
                select(StatisticShard.object_key).where(StatisticShard.statistic_id.in_(orphans)),
                select(StatisticShard.resume_object_key).where(StatisticShard.statistic_id.in_(orphans))))
            record_deleted(session, keys, now)
            session.execute(delete(Statistic).where(Statistic.id.in_(orphans)))  # shards go by cascade
    deleted = kept = 0
    while True:
        with session_scope(session_factory) as session:
            due = select(DeletedObject.object_key).where(DeletedObject.deleted_at <= before).limit(SWEEP_CHUNK)
            # deleting the records first takes their locks (the whole database on SQLite) until commit
            keys = list(session.scalars(delete(DeletedObject).where(DeletedObject.object_key.in_(due))
                                        .returning(DeletedObject.object_key)))
            named = _named_keys(session, keys) if keys else set()
            for key in keys:
                if key not in named:
                    store.delete(key)  # a store error rolls the records back for the next sweep
        deleted += len(keys) - len(named)
        kept += len(named)
        if len(keys) < SWEEP_CHUNK:
            return {"statistics": len(orphans), "objects": deleted, "kept": kept}
