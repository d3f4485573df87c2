"""Shared layer statistics: each (model sha256, layer, sample spec) computed once, in shards.

A ``Statistic`` row names one second moment (``rewriting.statistics``) of one layer's
keys, for one checkpoint's bytes, over one set of seeds. It is shared by every job and
every tenant. Jobs converge on one row (insert-if-absent on the unique key), and one
computation: a worker computes only while it holds a lease, taken by a compare-and-set
on ``fencing_token``; the others wait for ``ready``, and take a lease over if its holder
dies (the lease expires) or gives up.

Small statistics (at most ``shard_samples`` images, ``PALIMPSEST_SHARD_SAMPLES``) are
computed in one piece, under the statistic row's own lease:

    pending/failed --claim--> computing --complete--> ready
                 ^-- release (cancelled: pending; error: failed) --'

Larger ones are split by seed range into ``StatisticShard`` rows (``shard_count`` on the
statistic; the first worker to need it plans the shards, by a compare-and-set on that
column). Each shard has its own lease, its own ``compute_shard`` task on the ``gpu``
queue (sent once when planned, at the top broker priority, so free workers take it before
queued jobs) and its own partial moment in the store
(``shared/statistic_shards/<sha256>/second_moment.safetensors``). A worker that needs the
statistic does not only wait: it computes whichever shard nobody holds, so a batch's
members and the free workers share the work. A lost shard (its lease expired) or a
failed one is claimed and recomputed alone, and sent again for the free workers; the
shards already done are kept. Once every shard is ready, whoever sees it first (the
worker that finished the last shard, or a waiter) takes the statistic row's lease (a
compare-and-set, so exactly one merges) and adds the float64 partial moments in seed
order: the merge equals the one-piece computation up to float64 rounding, because the
shard size is rounded up to whole batches, so every float32 batch product is the same
one either way (``rewriting.statistics.SecondMoment``).

A computation stopped part-way (its job cancelled, its worker handing back) saves the
moment of the seeds done so far at ``shared/statistic_resume/<sha256>/...`` and names it on
its row (``resume_object_key``); the next claim goes on from the seed after them, and the
row's completion drops it (``storage.deletion`` sweeps the object). A worker that dies
leaves nothing to go on from: its piece is counted again from its first seed.

Sample specs (``seeds:<start>-<stop>``, half-open; ``sample_spec(samples)`` starts at
seed 100000) and the row's insert-if-absent live in ``storage.statistics``, shared with
the API. Statistics files live at
``shared/statistics/<sha256 of the file>/second_moment.safetensors``.

The engine (torch) is imported inside the functions that compute, so that importing
this module stays cheap.
"""
import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from celery import shared_task
from kombu.exceptions import OperationalError
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from storage.db import session_scope
from storage.deletion import record_deleted
from storage.models import Artifact, Model, Statistic, StatisticShard, utcnow
from storage.objects import ObjectNotFound, StorageUnavailable
from storage.statistics import insert_statistic, parse_sample_spec
from workers import deliveries
from workers.retry import retry_transaction

log = logging.getLogger(__name__)

WAIT_POLL_SECONDS = 0.5
# Shards are whole batches of the statistic (images per forward pass: 64 on a CPU, 256 on
# CUDA, rewriting.statistics.default_batch_size): sizes are rounded up to a multiple of 64,
# and the default shard_samples (2048) is a multiple of 256 too.
SHARD_MULTIPLE = 64
COMPUTE_SHARD = "workers.statistics.compute_shard"
SHARD_BROKER_PRIORITY = 0  # Redis serves 0 first: a free worker takes a shard before any queued job


class StatisticUnavailable(Exception):
    """The statistic cannot be computed here (e.g. no checkpoint with its model sha256)."""

    code = "statistic_unavailable"


# --- leases: a statistic row, or one of its shards ---------------------------------------
# Both tables carry the same lease and result columns; a row id's prefix says which table.

def _table(row_id: str):
    return StatisticShard if row_id.startswith("shd_") else Statistic


def claim_statistic(session: Session, row, owner: str, ttl: float, now: datetime | None = None) -> int | None:
    """Take the lease to compute ``row`` (a Statistic, or a StatisticShard); the new fencing
    token, or None (ready, or held by a live lease)."""
    now = now or utcnow()
    if row.status == "ready" or (row.lease_expires_at is not None and row.lease_expires_at > now):
        return None
    table = type(row)
    token = row.fencing_token + 1
    values = dict(status="computing", lease_owner=owner, lease_expires_at=now + timedelta(seconds=ttl),
                  fencing_token=token, error=None, updated_at=now)
    if table is StatisticShard:
        values["attempts"] = StatisticShard.attempts + 1
    result = session.execute(
        update(table).where(table.id == row.id, table.fencing_token == row.fencing_token, table.status != "ready")
        .values(**values).execution_options(synchronize_session=False))
    if result.rowcount != 1:
        return None
    if table is StatisticShard:  # someone works on the statistic (again)
        session.execute(update(Statistic).where(Statistic.id == row.statistic_id,
                                                Statistic.status.in_(("pending", "failed")))
                        .values(status="computing", error=None, updated_at=now)
                        .execution_options(synchronize_session=False))
    return token


def _held(row_id: str, token: int):
    table = _table(row_id)
    return table, (table.id == row_id, table.fencing_token == token, table.status == "computing")


def renew_statistic(session: Session, row_id: str, token: int, ttl: float) -> bool:
    """Extend the lease; False when it was lost (taken over after it expired)."""
    now = utcnow()
    table, held = _held(row_id, token)
    result = session.execute(update(table).where(*held)
                             .values(lease_expires_at=now + timedelta(seconds=ttl), updated_at=now)
                             .execution_options(synchronize_session=False))
    return result.rowcount == 1


def resume_of(session: Session, row_id: str, token: int) -> tuple[str, str] | None:
    """(object key, sha256) of the partial moment the statistic (or shard) names, read under
    the lease (``token``): only its holder changes it, so it holds until the lease ends."""
    table, held = _held(row_id, token)
    row = session.execute(select(table.resume_object_key, table.resume_sha256).where(*held)).first()
    return tuple(row) if row is not None and row[0] is not None else None


def _replace_resume(session: Session, row_id: str, token: int, new_key: str | None) -> None:
    """Record for the sweep the partial moment the row names, when ``new_key`` replaces it."""
    old = resume_of(session, row_id, token)
    if old is not None and old[0] != new_key:
        record_deleted(session, [old[0]])


def complete_statistic(session: Session, row_id: str, token: int, stored, count: int) -> bool:
    """Mark the statistic (or shard) ready at ``stored`` (a StoredObject), its partial moment
    dropped; False when the lease was lost."""
    table, held = _held(row_id, token)
    _replace_resume(session, row_id, token, None)
    result = session.execute(update(table).where(*held).values(
        status="ready", object_key=stored.key, sha256=stored.sha256, size=stored.size, count=count,
        resume_object_key=None, resume_sha256=None, lease_owner=None, lease_expires_at=None, error=None,
        updated_at=utcnow())
        .execution_options(synchronize_session=False))
    return result.rowcount == 1


def release_statistic(session: Session, row_id: str, token: int, error: str | None = None,
                      handed_back: bool = False, resume=None) -> bool:
    """Give the lease up: back to ``pending`` (cancelled), or ``failed`` with ``error``; the next
    worker that needs it tries again. A shard's statistic follows when no other worker
    holds one of its shards: ``failed`` (with the shard's reason) or ``pending``.
    ``handed_back``: the worker is stopping, so a shard's claim is given back (``attempts``):
    an orderly stop is not a worker death. ``resume``: the stored object (``key``,
    ``sha256``) of the moment so far, for the next claim to go on from; without it, a
    partial moment the row names is kept. False when the lease was lost."""
    table, held = _held(row_id, token)
    now = utcnow()
    values = dict(status="failed" if error else "pending", error=error, lease_owner=None, lease_expires_at=None,
                  updated_at=now)
    if handed_back and table is StatisticShard:
        values["attempts"] = StatisticShard.attempts - 1
    if resume is not None:
        _replace_resume(session, row_id, token, resume.key)
        values.update(resume_object_key=resume.key, resume_sha256=resume.sha256)
    result = session.execute(update(table).where(*held).values(**values).execution_options(synchronize_session=False))
    if table is StatisticShard and result.rowcount == 1:
        statistic_id = session.scalar(select(StatisticShard.statistic_id).where(StatisticShard.id == row_id))
        held_elsewhere = session.scalar(select(StatisticShard.id).where(
            StatisticShard.statistic_id == statistic_id, StatisticShard.status == "computing",
            StatisticShard.lease_expires_at > now).limit(1))
        if held_elsewhere is None:
            session.execute(update(Statistic).where(Statistic.id == statistic_id, Statistic.status == "computing",
                                                    Statistic.lease_owner.is_(None))
                            .values(status="failed" if error else "pending",
                                    error=f"shard {row_id}: {error}" if error else None, updated_at=now)
                            .execution_options(synchronize_session=False))
    return result.rowcount == 1


# --- shards ---------------------------------------------------------------------------------

def shard_ranges(seeds: range, shard_samples: int, multiple: int = SHARD_MULTIPLE) -> list[range]:
    """The seed ranges of the shards: ``shard_samples`` rounded up to whole batches, so that
    each shard's batches are exactly the batches of the one-piece computation."""
    size = -(-shard_samples // multiple) * multiple
    return [range(start, min(start + size, seeds.stop)) for start in range(seeds.start, seeds.stop, size)]


def plan_shards(session: Session, stat: Statistic, shard_samples: int,
                multiple: int = SHARD_MULTIPLE, now: datetime | None = None) -> list[StatisticShard]:
    """Split ``stat`` into shards if it is large and nobody decided yet; the shards created
    (to send), or [] (small, decided already, ready, or computed whole under a live lease).

    The split is a compare-and-set on ``shard_count`` in the transaction that inserts the
    shard rows, so concurrent planners agree on one set of shards."""
    now = now or utcnow()
    if stat.shard_count is not None or stat.status == "ready":
        return []
    ranges = shard_ranges(parse_sample_spec(stat.sample_spec), shard_samples, multiple)
    if len(ranges) < 2:
        return []
    won = session.execute(
        update(Statistic).where(Statistic.id == stat.id, Statistic.shard_count.is_(None), Statistic.status != "ready",
                                unheld(Statistic, now))
        .values(shard_count=len(ranges), status="computing", lease_owner=None, lease_expires_at=None,
                error=None, updated_at=now)
        .execution_options(synchronize_session=False)).rowcount == 1
    if not won:
        return []
    shards = [StatisticShard(statistic_id=stat.id, number=i, seed_start=r.start, seed_stop=r.stop, status="pending",
                             fencing_token=0, attempts=0, created_at=now, updated_at=now)
              for i, r in enumerate(ranges)]
    session.add_all(shards)
    session.flush()
    return shards


def shards_of(session: Session, statistic_id: str) -> list[StatisticShard]:
    return list(session.scalars(select(StatisticShard).where(StatisticShard.statistic_id == statistic_id)
                                .order_by(StatisticShard.number).execution_options(populate_existing=True)))


def unheld(table, now: datetime):
    """A ``where`` condition: no live lease on the row (``Statistic`` or ``StatisticShard``)."""
    return or_(table.lease_expires_at.is_(None), table.lease_expires_at <= now)


def _open(shard: StatisticShard, now: datetime) -> bool:
    """Nobody computes it and it is not done: never claimed, released, failed, or its holder died."""
    return shard.status != "ready" and (shard.lease_expires_at is None or shard.lease_expires_at <= now)


@dataclass
class Step:
    """What a worker that needs a statistic does next (``next_step``)."""

    action: str  # ready | whole | shard | merge | wait
    token: int | None = None  # the lease taken (whole, shard, merge)
    shard: StatisticShard | None = None
    resend: list = field(default_factory=list)  # (shard id, fencing token): lost or failed shards to send again
    done: int = 0  # images in ready shards
    total: int = 0


def next_step(session: Session, stat: Statistic, owner: str, ttl: float, now: datetime | None = None) -> Step:
    """Claim the next piece of work on ``stat``: the whole statistic (unsharded), an open
    shard, or the merge once every shard is ready; or nothing (``wait``)."""
    now = now or utcnow()
    total = len(parse_sample_spec(stat.sample_spec))
    if stat.status == "ready":
        return Step("ready", done=total, total=total)
    if stat.shard_count is None:
        token = claim_statistic(session, stat, owner, ttl, now)
        return Step("whole" if token else "wait", token, total=total)
    shards = shards_of(session, stat.id)
    done = sum(s.seed_stop - s.seed_start for s in shards if s.status == "ready")
    if done == total:
        token = claim_merge(session, stat, owner, ttl, now, shards)
        return Step("merge" if token else "wait", token, done=done, total=total)
    step = Step("wait", done=done, total=total)
    for shard in (s for s in shards if _open(s, now)):
        if step.action == "wait" and (token := claim_statistic(session, shard, owner, ttl, now)) is not None:
            step.action, step.token, step.shard = "shard", token, shard
        elif shard.fencing_token > 0:  # it ran before and was lost or failed: offer it to the free workers
            step.resend.append((shard.id, shard.fencing_token))
    return step


def claim_merge(session: Session, stat: Statistic, owner: str, ttl: float, now: datetime | None = None,
                shards: list | None = None) -> int | None:
    """The statistic's lease to merge its shards, if they are all ready and nobody holds it."""
    shards = shards_of(session, stat.id) if shards is None else shards
    if stat.shard_count is None or len(shards) != stat.shard_count or any(s.status != "ready" for s in shards):
        return None
    return claim_statistic(session, stat, owner, ttl, now)


HANDED_BACK = "handed_back"  # what process_statistic and process_shard return when the worker was stopping


def shard_sender(app):
    """``send(shard_id)`` through a Celery app: ``compute_shard`` at the top broker priority."""
    return lambda shard_id: app.send_task(COMPUTE_SHARD, args=[shard_id], priority=SHARD_BROKER_PRIORITY)


def _send(send_shard, shard_ids) -> None:
    """Send shard tasks; a broker hiccup is logged, not raised: the waiters compute open shards anyway."""
    if send_shard is None:
        return
    for shard_id in shard_ids:
        try:
            send_shard(shard_id)
        except (OperationalError, OSError):
            log.warning("could not send %s(%s); the workers that wait on it will compute it",
                        COMPUTE_SHARD, shard_id, exc_info=True)


# --- computing ---------------------------------------------------------------------------

def _upload_moment(session_factory, store, cache: Path, moment, kind: str, metadata: dict, retry_s: float = 0):
    """Save ``moment`` (safetensors) and put it in the store under ``kind``; the StoredObject."""
    from workers.artifacts import put_file

    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        path = Path(tmp) / "second_moment.safetensors"
        moment.save(path, metadata=metadata)
        return put_file(session_factory, store, path, None, kind, "second_moment.safetensors",
                        "application/octet-stream", db_retry_s=retry_s)


def _release(session_factory, row_id: str, token: int, retry_s: float, error: str | None = None,
             handed_back: bool = False, resume=None) -> None:
    released = retry_transaction(session_factory, lambda session: release_statistic(
        session, row_id, token, error=error, handed_back=handed_back, resume=resume),
        budget_s=retry_s, what=f"{row_id}: release")
    if not released and resume is not None:  # no row will name it: for the sweep
        retry_transaction(session_factory, lambda session: record_deleted(session, [resume.key]),
                          budget_s=retry_s, what=f"{row_id}: drop resume")


RESUME_KIND = "statistic_resume"  # shared/statistic_resume/<sha256>/second_moment.safetensors


def _save_partial(session_factory, store, cache: Path, row_id: str, partial, spec: str, retry_s: float):
    """Upload a stopped computation's moment so far (one try: a stopping worker's kill is
    near); its StoredObject, or None, and the next claim counts from the first seed."""
    try:
        return _upload_moment(session_factory, store, cache, partial, RESUME_KIND, {"sample_spec": spec}, retry_s)
    except Exception:
        log.warning("%s: its moment so far was not saved; the next claim counts from the first seed", row_id,
                    exc_info=True)
        return None


def _load_partial(session_factory, store, cache: Path, row_id: str, token: int, seeds: range, retry_s: float):
    """The moment so far that the row names (read under the lease), or None: none, or
    unreadable (then the computation counts from the first seed)."""
    from rewriting.errors import CheckpointError, EditRequestError
    from rewriting.seeds import parse_seeds
    from rewriting.statistics import SecondMoment
    from workers.artifacts import ChecksumMismatch, fetch

    named = retry_transaction(session_factory, lambda session: resume_of(session, row_id, token),
                              budget_s=retry_s, what=f"{row_id}: read resume")
    if named is None:
        return None
    try:
        partial = SecondMoment.load(fetch(store, named[0], cache, named[1]))
        done = len(parse_seeds(partial.metadata["seeds"]))
    except (ObjectNotFound, ChecksumMismatch, CheckpointError, StorageUnavailable, KeyError, EditRequestError):
        log.warning("%s: its saved moment cannot be read; counting from the first seed", row_id, exc_info=True)
        return None
    log.info("%s: going on from image %d of %d", row_id, done, len(seeds))
    return partial


def _complete(session_factory, row_id: str, token: int, stored, count: int, retry_s: float) -> bool:
    return retry_transaction(session_factory, lambda session: complete_statistic(session, row_id, token, stored, count),
                             budget_s=retry_s, what=f"{row_id}: complete")


def _read_statistic(session_factory, statistic_id: str, retry_s: float) -> Statistic:
    return retry_transaction(session_factory,
                             lambda session: session.get(Statistic, statistic_id, populate_existing=True),
                             budget_s=retry_s, what=f"{statistic_id}: read")


def _compute_piece(session_factory, store, cache: Path, model, row_id: str, token: int, layer: str,
                   seeds: range, model_sha256: str, heartbeat, progress, kind: str,
                   retry_s: float = 0):
    """Compute the second moment over ``seeds`` under the lease (``row_id``, ``token``), upload
    it and mark the row ready (images per batch: the engine's default for the model's device).
    Returns the moment, or None when the lease was lost (someone
    else finishes it). A cancel releases the row (pending), an error fails it; both raise.
    A cancel (a cancelled job, a worker handing back) first saves the moment so far and
    names it on the row, and the next claim goes on from the seed after it.
    Its database transactions are retried for ``retry_s`` while the database is away."""
    from rewriting.errors import Cancelled
    from rewriting.statistics import compute_second_moment
    from workers.resume import run_resumed

    spec = f"seeds:{seeds.start}-{seeds.stop}"
    heartbeat.hold_statistic(row_id, token)

    def compute(resume):
        return compute_second_moment(
            model, layer, f"{seeds.start}-{seeds.stop - 1}", progress=progress,
            should_stop=lambda: heartbeat.should_stop() or heartbeat.statistic_lost, model_sha256=model_sha256,
            resume=resume)

    try:
        resume = _load_partial(session_factory, store, cache, row_id, token, seeds, retry_s)
        moment, _ = run_resumed(compute, resume, row_id)
        stored = _upload_moment(session_factory, store, cache, moment, kind, {"sample_spec": spec}, retry_s)
    except Cancelled as e:
        if heartbeat.statistic_lost and not heartbeat.should_stop():
            return None  # our lease expired and another worker took over
        partial = None if e.state is None else _save_partial(session_factory, store, cache, row_id, e.state, spec,
                                                             retry_s)
        _release(session_factory, row_id, token, retry_s, handed_back=heartbeat.handing_back, resume=partial)
        raise
    except BaseException as e:
        _release(session_factory, row_id, token, retry_s, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        heartbeat.drop_statistic()
    done = _complete(session_factory, row_id, token, stored, moment.count, retry_s)
    log.info("computed %s over %s%s", row_id, spec, "" if done else " (lease lost: discarded)")
    return moment if done else None


def merge_shards(session_factory, store, cache: Path, statistic_id: str, token: int, heartbeat,
                 retry_s: float = 0):
    """Add the ready shards' partial moments (float64, in seed order) into the statistic and
    mark it ready, under the statistic's lease; the merged ``SecondMoment`` (on the CPU),
    or None when the lease was lost."""
    from rewriting.statistics import SecondMoment
    from workers.artifacts import fetch

    stat, shards = retry_transaction(session_factory, lambda session: (
        session.get(Statistic, statistic_id, populate_existing=True), shards_of(session, statistic_id)),
        budget_s=retry_s, what=f"{statistic_id}: read shards")
    heartbeat.hold_statistic(statistic_id, token)
    try:
        total = None
        for shard in shards:
            part = SecondMoment.load(fetch(store, shard.object_key, cache, shard.sha256))
            total = part if total is None else total.merge(part)
        if total.metadata.get("seeds") != f"{shards[0].seed_start}-{shards[-1].seed_stop - 1}":
            raise RuntimeError(f"the shards of {statistic_id} cover {total.metadata.get('seeds')}, "
                               f"not {stat.sample_spec}")
        stored = _upload_moment(session_factory, store, cache, total, "statistics",
                                {"sample_spec": stat.sample_spec, "shards": str(len(shards))}, retry_s)
    except BaseException as e:
        _release(session_factory, statistic_id, token, retry_s, error=f"merge: {type(e).__name__}: {e}")
        raise
    finally:
        heartbeat.drop_statistic()
    done = _complete(session_factory, statistic_id, token, stored, total.count, retry_s)
    log.info("merged %d shards into statistic %s", len(shards), statistic_id)
    return (total, stored) if done else None


def ensure_statistic(session_factory, store, cache: Path, model, model_sha256: str, layer: str, spec: str,
                     owner: str, ttl: float, heartbeat, progress=None,
                     statistic_id: str | None = None, shard_samples: int | None = None, warm=None,
                     send_shard=None, retry_s: float = 0):
    """The ready statistic of (``model_sha256``, ``layer``, ``spec``), as ``(SecondMoment, Statistic)``.

    Loads it if ready (through ``warm``, a ``workers.cache.WorkerCache``, if given). Else
    works on it with ``model`` (already on its device) until it is ready: computes it whole
    if it is small, or, over more than ``shard_samples`` images (None: never sharded),
    plans the shards (sending their tasks with ``send_shard(shard_id)``), computes open
    shards, and merges them when all are ready; waits while others hold what is left.
    ``heartbeat`` (workers.heartbeat.Heartbeat) keeps the caller's own lease alive meanwhile
    and renews the lease this worker holds; its ``should_stop()`` (a cancel, a lost job
    lease) raises ``Cancelled``, polled while waiting and between batches.
    ``progress(done, total)`` follows the computation (images). Its database transactions
    are tried again while the database is away, for up to ``retry_s`` seconds each.
    """
    from rewriting.errors import Cancelled
    from rewriting.statistics import SecondMoment
    from workers.artifacts import fetch
    from workers.cache import WorkerCache

    warm = warm if warm is not None else WorkerCache()
    device = _device_of(model)
    seeds = parse_sample_spec(spec)
    sent = set()  # (shard id, fencing token) sent by this caller

    def look(session):
        if statistic_id is None:
            stat = insert_statistic(session, model_sha256, layer, spec)
        else:
            stat = session.get(Statistic, statistic_id, populate_existing=True)
        planned = plan_shards(session, stat, shard_samples) if shard_samples else []
        if planned:
            session.refresh(stat)
        return stat, planned, next_step(session, stat, owner, ttl)

    while True:
        stat, planned, step = retry_transaction(session_factory, look, budget_s=retry_s,
                                                what=f"statistic {layer} {spec}: next step",
                                                give_up=heartbeat.should_stop)
        statistic_id = stat.id
        _send(send_shard, [s.id for s in planned])
        sent.update((s.id, 0) for s in planned)
        _send(send_shard, [shard_id for shard_id, token in step.resend if (shard_id, token) not in sent])
        sent.update(step.resend)

        if step.action == "ready":
            moment = warm.statistic(stat.id, stat.sha256, lambda: SecondMoment.load(
                fetch(store, stat.object_key, cache, stat.sha256), device=device))
            return moment, stat
        if step.action == "wait":
            if heartbeat.should_stop():
                raise Cancelled("cancelled while waiting for a statistic")
            if progress is not None and step.done:
                progress(step.done, step.total)
            time.sleep(WAIT_POLL_SECONDS)
            continue
        if step.action == "whole":
            moment = _compute_piece(session_factory, store, cache, model, statistic_id, step.token, layer, seeds,
                                    model_sha256, heartbeat, progress, "statistics", retry_s)
            if moment is None:
                continue  # lost the lease: whoever holds it now finishes; wait for it
            stat = _read_statistic(session_factory, statistic_id, retry_s)
            warm.keep_statistic(stat.id, stat.sha256, moment)
            return moment, stat
        if step.action == "shard":
            shard = step.shard
            report = None if progress is None else (
                lambda done, total, before=step.done: progress(before + done, step.total))
            _compute_piece(session_factory, store, cache, model, shard.id, step.token, layer,
                           range(shard.seed_start, shard.seed_stop), model_sha256, heartbeat, report,
                           "statistic_shards", retry_s)
            continue  # then the next shard, or the merge
        merged = merge_shards(session_factory, store, cache, statistic_id, step.token, heartbeat, retry_s)
        if merged is None:
            continue
        stat = _read_statistic(session_factory, statistic_id, retry_s)
        moment = merged[0].to(device)
        warm.keep_statistic(stat.id, stat.sha256, moment)
        return moment, stat


def _device_of(model):
    from rewriting.layers import model_device

    return model_device(model)


def checkpoint_for(session: Session, model_sha256: str) -> tuple[str, str | None]:
    """(object key, architecture) of a checkpoint with these bytes: a registered model or a
    job's ``checkpoint`` artifact (a chained edit's base)."""
    model = session.scalars(select(Model).where(Model.sha256 == model_sha256, Model.status == "ready")
                            .order_by(Model.created_at).limit(1)).first()
    if model is not None:
        return model.object_key, model.architecture
    artifact = session.scalars(select(Artifact).where(Artifact.name == "checkpoint",
                                                      Artifact.sha256 == model_sha256).limit(1)).first()
    if artifact is not None:
        return artifact.object_key, None
    raise StatisticUnavailable(f"no ready model or checkpoint artifact has sha256 {model_sha256[:12]}")


def load_checkpoint(store, settings, key: str, sha256: str, warm=None):
    """The model in the checkpoint at ``key`` (bytes ``sha256``) on the worker's device, from
    ``warm`` (a WorkerCache) when this process loaded it before."""
    from rewriting.checkpoint import load_model
    from workers.artifacts import cache_dir, fetch
    from workers.cache import WorkerCache
    from workers.device import resolve_device

    warm = warm if warm is not None else WorkerCache()
    return warm.model(sha256, lambda: load_model(fetch(store, key, cache_dir(settings.data_dir), sha256),
                                                 device=resolve_device(settings.device)))


def _fail_unheld(session: Session, statistic_id: str, error: str) -> None:
    """Record ``error`` on a statistic (``failed``) unless it is ready or a live lease holds it."""
    now = utcnow()
    session.execute(update(Statistic).where(Statistic.id == statistic_id, Statistic.status != "ready",
                                            unheld(Statistic, now))
                    .values(status="failed", error=error, updated_at=now)
                    .execution_options(synchronize_session=False))


def _give_up(session_factory, statistic_id: str, error: str) -> None:
    """Fail a statistic whose deliveries died. The last dead one left its lease on the row,
    live until it expires: wait that out (at most a lease), then fail it. A lease renewed
    meanwhile has a live holder (a job computing the statistic): leave it to that one."""
    seen = None
    while True:
        with session_scope(session_factory) as session:
            expires = session.scalar(select(Statistic.lease_expires_at).where(Statistic.id == statistic_id))
            if seen is not None and expires is not None and expires > seen:
                return
            if expires is None or expires <= utcnow():
                _fail_unheld(session, statistic_id, error)
                return
        seen = expires
        time.sleep((expires - utcnow()).total_seconds() + 0.1)


def process_statistic(session_factory, store, settings, statistic_id: str, owner: str | None = None,
                      warm=None, send_shard=None, shutdown=None) -> str | None:
    """The body of ``compute_statistic``: make the statistic ready (or find it ready).

    Returns its final status, None when the row does not exist, or ``HANDED_BACK`` when the
    worker was stopping (``shutdown``: its ``ShutdownNotice``): past the grace, the piece it
    computed was released and this delivery not counted, and the caller sends the task
    again for another worker. A failure is recorded
    on the row (``failed``, ``error``) and raised: no checkpoint with the statistic's bytes,
    or its object gone from the store or not matching its sha256. Deliveries are counted
    (``workers.deliveries``): past ``PALIMPSEST_JOB_MAX_ATTEMPTS`` of them (a statistic
    whose computation kills its worker) it is failed ``worker_lost`` instead."""
    from rewriting.errors import Cancelled
    from workers.artifacts import ChecksumMismatch, cache_dir
    from workers.heartbeat import Heartbeat, handback_after, worker_name

    owner = owner or worker_name()
    with session_scope(session_factory) as session:
        stat = session.get(Statistic, statistic_id)
        if stat is None:
            return None
        if stat.status == "ready":
            return "ready"
    with deliveries.counted(session_factory, Statistic, statistic_id, settings.db_retry_seconds) as number:
        if deliveries.given_up(number, settings.job_max_attempts):
            _give_up(session_factory, statistic_id, deliveries.lost_message("compute_statistic", number))
            return _read_statistic(session_factory, statistic_id, settings.db_retry_seconds).status
        try:
            with session_scope(session_factory) as session:
                key, _ = checkpoint_for(session, stat.model_sha256)
            model = load_checkpoint(store, settings, key, stat.model_sha256, warm)
        except (StatisticUnavailable, ObjectNotFound, ChecksumMismatch) as e:
            # nothing to compute from: fail it, or the reconciler would send it again forever
            error = str(e) if isinstance(e, StatisticUnavailable) else f"checkpoint: {type(e).__name__}: {e}"
            with session_scope(session_factory) as session:
                _fail_unheld(session, statistic_id, error)
            raise
        handback = handback_after(shutdown, settings.worker_shutdown_grace_seconds)
        with Heartbeat(session_factory, settings.job_lease_seconds, handback=handback) as heartbeat:
            try:
                _, stat = ensure_statistic(session_factory, store, cache_dir(settings.data_dir), model,
                                           stat.model_sha256, stat.layer, stat.sample_spec, owner,
                                           settings.job_lease_seconds, heartbeat, statistic_id=statistic_id,
                                           shard_samples=settings.shard_samples, warm=warm, send_shard=send_shard,
                                           retry_s=settings.db_retry_seconds)
            except Cancelled:
                if not heartbeat.handing_back:
                    raise
                deliveries.give_back(session_factory, Statistic, statistic_id, settings.db_retry_seconds)
                log.info("%s: handed back (the worker is stopping)", statistic_id)
                return HANDED_BACK
    return stat.status


def give_up_shard(session: Session, shard: StatisticShard, max_attempts: int) -> bool:
    """Fail a shard claimed ``max_attempts`` times that is still not done and held by nobody
    (its workers died, or kept failing), and its statistic, ``worker_lost``: a
    ``compute_shard`` that kills its worker is not run again. A job that needs the
    statistic may still claim it (bounded by the job's own attempts)."""
    now = utcnow()
    error = (f"{deliveries.WORKER_LOST}: claimed {shard.attempts} times without finishing "
             f"(at most {max_attempts}); last: {shard.error or 'its worker died'}")
    result = session.execute(update(StatisticShard).where(
        StatisticShard.id == shard.id, StatisticShard.fencing_token == shard.fencing_token,
        StatisticShard.status != "ready", unheld(StatisticShard, now))
        .values(status="failed", error=error, lease_owner=None, lease_expires_at=None, updated_at=now)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        return False
    _fail_unheld(session, shard.statistic_id, f"shard {shard.id}: {error}")
    return True


def process_shard(session_factory, store, settings, shard_id: str, owner: str | None = None,
                  warm=None, shutdown=None) -> str | None:
    """The body of ``compute_shard``: compute one shard of the statistic, then merge it if
    every shard is ready. The shard named, or, when another worker holds it or it is done,
    the next open shard of the same statistic: a message is one shard's worth of work, so
    a free worker helps even when the worker that planned the shards took its shard first.

    Returns what it did (``computed``, ``merged``), or None when there was nothing to do (no
    such shard, the statistic ready, every open shard held, or the lease was lost on the
    way). A failure is recorded on the shard and raised. A shard named that was claimed
    ``PALIMPSEST_JOB_MAX_ATTEMPTS`` times already and is still open is failed instead
    (``give_up_shard``). ``HANDED_BACK`` when the worker was stopping (``shutdown``), as for
    ``process_statistic``: the shard is released and its claim given back."""
    from rewriting.errors import Cancelled
    from workers.artifacts import cache_dir
    from workers.heartbeat import Heartbeat, handback_after, worker_name

    owner = owner or worker_name()
    ttl = settings.job_lease_seconds
    cache = cache_dir(settings.data_dir)
    handback = handback_after(shutdown, settings.worker_shutdown_grace_seconds)
    with Heartbeat(session_factory, ttl, handback=handback) as heartbeat:
        unavailable = key = None
        with session_scope(session_factory) as session:
            shard = session.get(StatisticShard, shard_id, populate_existing=True)
            stat = shard and session.get(Statistic, shard.statistic_id, populate_existing=True)
            if shard is None or stat.status == "ready":
                return None
            if shard.attempts >= settings.job_max_attempts and _open(shard, utcnow()):
                give_up_shard(session, shard, settings.job_max_attempts)
                return None
            token = claim_statistic(session, shard, owner, ttl)
            step = Step("shard", token, shard) if token is not None else next_step(session, stat, owner, ttl)
            if step.action == "shard":
                try:
                    key, _ = checkpoint_for(session, stat.model_sha256)
                except StatisticUnavailable as e:
                    unavailable = e
        if step.action == "merge":
            merged = merge_shards(session_factory, store, cache, stat.id, step.token, heartbeat,
                                  settings.db_retry_seconds)
            return "merged" if merged is not None else None
        if step.action != "shard":  # ready, or every open shard is held (a whole statistic is not ours)
            return None
        shard = step.shard
        heartbeat.hold_statistic(shard.id, step.token)  # renewed from now on, also while the checkpoint loads
        if unavailable is not None:
            with session_scope(session_factory) as session:
                release_statistic(session, shard.id, step.token, error=str(unavailable))
            raise unavailable
        try:
            model = load_checkpoint(store, settings, key, stat.model_sha256, warm)
        except BaseException as e:
            with session_scope(session_factory) as session:
                release_statistic(session, shard.id, step.token, error=f"{type(e).__name__}: {e}")
            raise
        try:
            moment = _compute_piece(session_factory, store, cache, model, shard.id, step.token, stat.layer,
                                    range(shard.seed_start, shard.seed_stop), stat.model_sha256, heartbeat, None,
                                    "statistic_shards", settings.db_retry_seconds)
        except Cancelled:
            if not heartbeat.handing_back:
                raise
            log.info("%s: handed back (the worker is stopping)", shard.id)
            return HANDED_BACK
        if moment is None:
            return None
        with session_scope(session_factory) as session:
            stat = session.get(Statistic, stat.id, populate_existing=True)
            token = claim_merge(session, stat, owner, ttl)
        if token is None:  # shards left, or another worker merges
            return "computed"
        merged = merge_shards(session_factory, store, cache, stat.id, token, heartbeat, settings.db_retry_seconds)
        if merged is not None and warm is not None:
            warm.keep_statistic(stat.id, merged[1].sha256, merged[0].to(_device_of(model)))
        return "merged" if merged is not None else "computed"


@shared_task(bind=True, name="workers.statistics.compute_statistic")
def compute_statistic(self, statistic_id: str) -> None:
    """Precompute a statistic (``POST /v1/statistics``). Queue ``gpu``. Safe to run twice:
    a ready statistic is left alone, one being computed elsewhere is waited for (and its
    open shards computed)."""
    from workers.heartbeat import send_handed_back

    status = process_statistic(self.app.session_factory, self.app.store, self.app.settings, statistic_id,
                               warm=self.app.cache, send_shard=shard_sender(self.app),
                               shutdown=self.app.shutdown_notice)
    if status == HANDED_BACK:
        send_handed_back(lambda: self.app.send_task(self.name, args=[statistic_id]), statistic_id)


@shared_task(bind=True, name=COMPUTE_SHARD)
def compute_shard(self, shard_id: str) -> None:
    """Compute one shard of a statistic (and merge, if it was the last). Queue ``gpu``. Safe
    to run twice: a ready shard, or one held by a live lease, is left alone."""
    from workers.heartbeat import send_handed_back

    did = process_shard(self.app.session_factory, self.app.store, self.app.settings, shard_id, warm=self.app.cache,
                        shutdown=self.app.shutdown_notice)
    if did == HANDED_BACK:
        send_handed_back(lambda: shard_sender(self.app)(shard_id), shard_id)
