"""Merged edits: a batch's succeeded members on one checkpoint and layer, solved jointly.

``merge_batch(batch_id)`` (queue ``gpu``) runs for a batch created with ``merge``, once
all its members have ended (``workers.batches.refresh_batch`` moves the batch to
``finalizing`` and sends it). It groups the succeeded members by (base checkpoint
sha256, layer) and for each group:

1. loads the base model (through the worker's cache) and recomputes every member's edit
   targets with ``rewriting.edit.edit_targets`` from the job row (the member's own
   statistic, for erase's salient units);
2. takes each member's context directions from its own delta artifact, and solves all the
   rules together with ``rewriting.merge.merge_rules``: one low-rank update over the
   union of their directions (the members' insert settings: the first member's
   method, lr and loss, the most steps any member asked for; a closed form takes the
   least change in the C metric of the members' statistic with the most samples);
3. uploads, content-addressed in the batch's tenant space, the merged delta, the merged
   checkpoint (the base with that delta, ``rewriting.delta.materialize``) and a report:

       tenants/<tenant>/delta/<sha256>/delta.safetensors
       tenants/<tenant>/checkpoint/<sha256>/model.safetensors
       tenants/<tenant>/merge_report/<sha256>/merge_report.json

   The report gives each rule's constraint loss unedited, alone (its own delta) and in
   the merged model, with its job and custom id;
4. records a ``BatchMerge`` row (status ``succeeded``, or ``failed`` with ``error_code``
   when the engine refuses the group, e.g. a layer without a spatial map).

Then ``workers.batches.complete_batch`` ends the batch. Safe to run twice: a group
with a ``BatchMerge`` row is skipped, rows are inserted if absent, and uploads are
content-addressed. A store or database outage raises and leaves the batch
``finalizing``; ``workers.batches.sweep`` sends the task again (not while a delivery is
under way). Any other error fails the group's merge (``object_missing`` for a member's
delta gone from the store, ``internal_error`` for a bug), and the batch completes.
Deliveries are counted (``workers.deliveries``): past ``PALIMPSEST_JOB_MAX_ATTEMPTS`` (a merge
that kills its worker), the groups left are recorded failed ``worker_lost`` and the batch
completes.

The API shows the ``BatchMerge`` rows with the batch (``api/batches.py``). The engine
(torch) is imported inside the functions that compute.
"""
import json
import logging
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from storage.db import session_scope
from storage.deletion import record_deleted
from storage.models import Artifact, Batch, BatchMerge, Job, Statistic, new_id, utcnow
from storage.objects import ObjectNotFound, StorageUnavailable
from workers import deliveries
from workers.retry import retry_transaction
from workers.statistics import HANDED_BACK

log = logging.getLogger(__name__)


def record_merge(session, **columns) -> bool:
    """Insert the batch's merge of (model_sha256, layer) unless one exists; True if inserted."""
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[session.get_bind().dialect.name]
    # Core inserts skip the ORM's Python-side defaults, so they are given here.
    result = session.execute(insert(BatchMerge).values(id=new_id("bmg"), created_at=utcnow(), **columns)
                             .on_conflict_do_nothing(index_elements=["batch_id", "model_sha256", "layer"])
                             .returning(BatchMerge.id))
    return result.scalar() is not None


def member_groups(session, batch_id: str, default_samples: int) -> dict:
    """Succeeded members by (base sha256, layer): {key: [(job, plan), ...]}, in submission order."""
    from rewriting.errors import EngineError
    from workers.jobs import JobFailed, plan_job

    groups = defaultdict(list)
    jobs = session.scalars(select(Job).where(Job.batch_id == batch_id, Job.status == "succeeded")
                           .order_by(Job.created_at, Job.id)).all()
    for job in jobs:
        try:
            plan = plan_job(session, job.id, default_samples)
        except (JobFailed, EngineError) as e:  # its model was deleted since, say: it cannot be merged
            log.warning("batch %s: member %s left out of the merge: %s", batch_id, job.id, e)
            continue
        groups[(plan.base_sha256, job.layer)].append(plan)
    return groups


def process_merge(session_factory, store, settings, batch_id: str, warm=None, celery=None,
                  shutdown=None) -> str | None:
    """The body of ``merge_batch``: merge each group not merged yet, then complete the batch.
    Returns the batch's status afterwards (None: no such batch), or ``HANDED_BACK`` when the
    worker was stopping (``shutdown``: its ``ShutdownNotice``, past the grace): the group
    being solved stopped between steps, its optimizer state saved on the batch, this
    delivery not counted, and the caller sends the task again. A batch that is not
    ``finalizing`` with ``merge`` set is left as it is."""
    from rewriting.errors import Cancelled
    from workers.batches import complete_batch
    from workers.heartbeat import handback_after

    stopping = handback_after(shutdown, settings.worker_shutdown_grace_seconds) or (lambda: False)

    with session_scope(session_factory) as session:
        batch = session.get(Batch, batch_id, populate_existing=True)
        if batch is None:
            return None
        if batch.status != "finalizing" or not batch.merge:
            return batch.status
        tenant_id = batch.tenant_id
    with deliveries.counted(session_factory, Batch, batch_id, settings.db_retry_seconds) as number:
        given_up = deliveries.given_up(number, settings.job_max_attempts)
        with session_scope(session_factory) as session:
            done = {(sha, layer) for sha, layer in session.execute(
                select(BatchMerge.model_sha256, BatchMerge.layer).where(BatchMerge.batch_id == batch_id))}
            groups = {key: plans for key, plans in member_groups(session, batch_id, settings.stat_samples).items()
                      if key not in done}
        for (base_sha256, layer), plans in groups.items():
            columns = dict(batch_id=batch_id, model_id=plans[0].model.id, model_sha256=base_sha256, layer=layer,
                           rules=len(plans))
            if given_up:
                columns.update(status="failed", error_code=deliveries.WORKER_LOST,
                               error_message=deliveries.lost_message("the merge", number))
            else:
                try:
                    columns.update(merge_or_failure(session_factory, store, settings, tenant_id, plans, warm,
                                                    batch_id, stopping))
                except Cancelled as e:
                    _hand_back(session_factory, store, settings, batch_id, tenant_id, e.state)
                    return HANDED_BACK
            if columns["status"] == "failed":
                log.warning("batch %s: merge of %s at %s failed: %s", batch_id, base_sha256[:12], layer,
                            columns["error_message"])
            with session_scope(session_factory) as session:
                record_merge(session, **columns)
                _set_resume(session, batch_id, None)  # the state was this group's
    complete_batch(session_factory, batch_id, celery)
    with session_scope(session_factory) as session:
        return session.scalar(select(Batch.status).where(Batch.id == batch_id))


def _set_resume(session, batch_id: str, stored) -> None:
    """Name ``stored`` (or nothing) as the batch's merge state; a state it replaces goes to the sweep."""
    old = session.scalar(select(Batch.resume_object_key).where(Batch.id == batch_id))
    if old is not None and old != (stored and stored.key):
        record_deleted(session, [old])
    if old is not None or stored is not None:
        session.execute(update(Batch).where(Batch.id == batch_id).values(
            resume_object_key=stored and stored.key, resume_sha256=stored and stored.sha256)
            .execution_options(synchronize_session=False))


def _hand_back(session_factory, store, settings, batch_id: str, tenant_id: str, state) -> None:
    """Save where the group's optimizer stood (None: keep what the batch names) and give
    this delivery back; the batch stays ``finalizing`` for the task sent again."""
    from workers.resume import save_state

    what = f"batch {batch_id}: merge"
    stored = None if state is None else save_state(session_factory, store, settings, tenant_id, state, what)
    if stored is not None:
        retry_transaction(session_factory, lambda session: _set_resume(session, batch_id, stored),
                          budget_s=settings.db_retry_seconds, what=f"{what}: save state")
    deliveries.give_back(session_factory, Batch, batch_id, settings.db_retry_seconds)
    log.info("%s handed back (the worker is stopping)%s", what,
             f", to go on from optimizer step {state.step}" if stored is not None else "")


def merge_or_failure(session_factory, store, settings, tenant_id: str, plans: list, warm=None,
                     batch_id: str | None = None, should_stop=None) -> dict:
    """``merge_group``'s columns, or a failure's (status, error_code, error_message). An outage
    of the store or the database raises instead: the merge is tried again later; so does a
    stop (``should_stop``: ``Cancelled``)."""
    from rewriting.errors import Cancelled, EngineError
    from workers.artifacts import ChecksumMismatch

    try:
        return merge_group(session_factory, store, settings, tenant_id, plans, warm, batch_id, should_stop)
    except (StorageUnavailable, DBAPIError, Cancelled):
        raise
    except (EngineError, ChecksumMismatch) as e:
        return dict(status="failed", error_code=e.code, error_message=str(e))
    except ObjectNotFound as e:
        return dict(status="failed", error_code="object_missing", error_message=f"no object at {e} in the store")
    except SoftTimeLimitExceeded:
        return dict(status="failed", error_code="timeout",
                    error_message=f"the merge ran past the soft time limit ({settings.task_soft_time_limit} s)")
    except Exception as e:  # a bug: recorded, so that the batch still ends
        log.exception("merge of %s failed unexpectedly", plans[0].base_sha256[:12])
        return dict(status="failed", error_code="internal_error", error_message=f"{type(e).__name__}: {e}")


def merge_group(session_factory, store, settings, tenant_id: str, plans: list, warm=None,
                batch_id: str | None = None, should_stop=None) -> dict:
    """Solve one group's rules jointly and upload the results; the BatchMerge columns.
    ``should_stop()`` is polled between rules and optimizer steps (``Cancelled``); the
    optimization goes on from the state ``batch_id`` names, if any (the groups are merged
    in order, so it is this one's)."""
    from rewriting.delta import EditDelta, materialize
    from rewriting.edit import edit_targets, insert_config
    from rewriting.errors import Cancelled, IncompatibleError
    from rewriting.layers import editable_layers, model_device
    from rewriting.merge import Rule, merge_rules
    from rewriting.requests import check_layer
    from rewriting.statistics import SecondMoment
    from workers.artifacts import cache_dir, fetch, put_bytes, put_file
    from workers.cache import WorkerCache
    from workers.resume import load_state, run_resumed
    from workers.statistics import load_checkpoint

    warm = warm if warm is not None else WorkerCache()
    cache = cache_dir(settings.data_dir)
    first = plans[0]
    layer, base_key, base_sha256 = first.job.layer, first.base_key, first.base_sha256
    model = load_checkpoint(store, settings, base_key, base_sha256, warm)
    infos = {info.name: info for info in editable_layers(model)}
    check_layer(layer, list(infos))

    with session_scope(session_factory) as session:
        ids = [plan.job.id for plan in plans]
        deltas = {a.job_id: a for a in session.scalars(select(Artifact).where(
            Artifact.job_id.in_(ids), Artifact.name == "delta"))}
        stats = {plan.job.id: session.get(Statistic, (plan.job.metrics or {}).get("statistic", {}).get("id"))
                 for plan in plans}
    rules, moments = [], {}
    for plan in plans:
        if should_stop is not None and should_stop():
            raise Cancelled("merge stopped before its optimization")
        job = plan.job
        stat, artifact = stats[job.id], deltas.get(job.id)
        if stat is None or stat.status != "ready" or artifact is None:
            raise IncompatibleError(f"job {job.id} has no delta or no ready statistic to merge from")
        moment = warm.statistic(stat.id, stat.sha256, lambda: SecondMoment.load(
            fetch(store, stat.object_key, cache, stat.sha256), device=model_device(model)))
        moments[stat.id] = moment
        alone = EditDelta.load(fetch(store, artifact.object_key, cache, artifact.sha256))
        targets = edit_targets(model, infos[layer], plan.request, moment, plan.request.params)
        rules.append(Rule(targets, alone.directions, alone=alone, name=job.custom_id or job.id))

    params = first.request.params
    config = replace(insert_config(params), method="closed_form" if params.method == "closed_form" else "lambda",
                     steps=max(plan.request.params.steps for plan in plans))
    # Every member's statistic estimates the same keys' moment; the closed form's metric is
    # the one from the most samples.
    metric_id, metric = max(moments.items(), key=lambda item: item[1].count)
    what = f"batch {batch_id}: merge of {base_sha256[:12]} at {layer}"
    with session_scope(session_factory) as session:
        named = session.execute(select(Batch.resume_object_key, Batch.resume_sha256)
                                .where(Batch.id == batch_id)).first() if batch_id else None
    resume = load_state(store, cache, *(named or (None, None)), what) if config.method != "closed_form" else None

    def merge(resume):
        return merge_rules(model, layer, rules, config, base_sha256=base_sha256, moment=metric,
                           should_stop=should_stop, resume=resume)

    result, resume = run_resumed(merge, resume, what)

    report = result.report()
    report.update(batch=first.job.batch_id, model=first.model.id, model_sha256=base_sha256, config=config.as_dict(),
                  statistic=metric_id, resumed_from_step=resume.step if resume else 0)
    for entry, plan in zip(report["per_rule"], plans):
        entry.update(job=plan.job.id, custom_id=plan.job.custom_id)
    body = json.dumps(report, sort_keys=True, indent=2).encode()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        checkpoint = Path(tmp) / "model.safetensors"
        checkpoint_sha256 = materialize(fetch(store, base_key, cache, base_sha256), [result.delta], checkpoint,
                                        base_sha256=base_sha256)
        delta = put_bytes(session_factory, store, result.delta.to_bytes(), tenant_id, "delta", "delta.safetensors",
                          "application/octet-stream", db_retry_s=settings.db_retry_seconds)
        stored = put_file(session_factory, store, checkpoint, tenant_id, "checkpoint", "model.safetensors",
                          "application/octet-stream", checkpoint_sha256, db_retry_s=settings.db_retry_seconds)
        report_object = put_bytes(session_factory, store, body, tenant_id, "merge_report", "merge_report.json",
                                  "application/json", db_retry_s=settings.db_retry_seconds)
    log.info("merged %d rules at %s of %s: rank %d, loss %.4g -> %.4g", len(rules), layer, base_sha256[:12],
             result.rank, result.initial_loss, result.loss)
    return dict(status="succeeded", rank=result.rank, report=report,
                delta_object_key=delta.key, delta_sha256=delta.sha256,
                checkpoint_object_key=stored.key, checkpoint_sha256=stored.sha256, checkpoint_size=stored.size,
                report_object_key=report_object.key, report_sha256=report_object.sha256)


@shared_task(bind=True, name="workers.merge.merge_batch")
def merge_batch(self, batch_id: str) -> None:
    """Merge a finalizing batch's edits per (model, layer), then complete it (see the module
    doc). Queue ``gpu``; safe to deliver twice."""
    from workers.heartbeat import send_handed_back

    status = process_merge(self.app.session_factory, self.app.store, self.app.settings, batch_id,
                           warm=self.app.cache, celery=self.app, shutdown=self.app.shutdown_notice)
    if status == HANDED_BACK:
        send_handed_back(lambda: self.app.send_task(self.name, args=[batch_id]), f"batch {batch_id}")
