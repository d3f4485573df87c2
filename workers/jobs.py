"""The edit job: ``run_job(job_id)``, on the ``gpu`` queue.

Everything is read from the database; the message carries the id only and is never
trusted. A delivery claims the job (``storage.lifecycle.claim``); one that gets no lease
(the job finished, was cancelled, or runs elsewhere) does nothing, so a redelivered or
duplicated message is harmless.

Phases, each written as a progress milestone (and progress in between, at most once a
second): ``loading`` (checkpoint from the store into the local cache, on the worker's
device), ``statistics`` (the shared second moment, ``workers.statistics``),
``optimizing`` (``rewriting.edit.run_edit``), ``evaluating`` (metrics on held-out seeds,
and the preview grid), ``uploading`` (the artifacts).

Artifacts, content-addressed (``workers.artifacts.put_file``), per tenant:

    tenants/<tenant>/delta/<sha256>/delta.safetensors        low-rank factors
    tenants/<tenant>/checkpoint/<sha256>/model.safetensors   the rewritten checkpoint
    tenants/<tenant>/preview/<sha256>/preview.png            before/after grid
    tenants/<tenant>/metrics/<sha256>/metrics.json           the metrics (also in jobs.metrics)

Their rows are inserted only after all four uploads completed, in the transaction that
marks the job succeeded, so no partial result is ever visible.

Failures end the job ``failed`` with ``error_code``: the engine's own codes
(``invalid_request``, ``unknown_layer``, ``incompatible``, ``invalid_checkpoint``),
``model_not_ready``, ``checksum_mismatch``, ``storage_unavailable``, ``object_missing``, ``timeout`` (the
soft time limit; or the hard one, recorded by the worker's parent process: ``JobRequest``),
``worker_lost`` (its workers died ``PALIMPSEST_JOB_MAX_ATTEMPTS`` times: ``storage.lifecycle.claim``
and the reconciler), or ``internal_error`` (a bug: also raised, so Celery logs it). A cancel
ends it ``cancelled``; a lost lease stops it without writing anything.
A worker that is stopping (SIGTERM) lets the job run for
``PALIMPSEST_WORKER_SHUTDOWN_GRACE_SECONDS``, then stops it between steps, releases it
(``queued`` again, ``storage.lifecycle.release``) with the state its optimizer had reached,
and sends the task again, so that another worker takes it at once and goes on from that
step (docs/workers.md, Shutdown).

Faults (docs/reliability.md): database writes are retried with backoff for
``PALIMPSEST_DB_RETRY_SECONDS`` and uploads for ``PALIMPSEST_STORAGE_RETRY_SECONDS``
(``workers.retry``); a store still down then fails the job ``storage_unavailable``, and a
database still down leaves it running, to be sent again by the reconciler once its lease
expires (``workers.reconcile``).
"""
import copy
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from celery import shared_task
from celery.worker.request import Request
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from rewriting.checkpoint import load_model
from rewriting.delta import applied, materialize
from rewriting.edit import run_edit
from rewriting.errors import Cancelled, EditRequestError, EngineError
from rewriting.layers import editable_layers
from rewriting.metrics import edit_metrics, held_out_seeds, segment
from rewriting.render import generate, image_grid
from rewriting.requests import check_layer, mask_at, parse_request
from storage import lifecycle
from storage.db import session_scope
from storage.deletion import record_deleted
from storage.models import Artifact, Job, Model
from storage.objects import ObjectNotFound, StorageUnavailable
from workers.batches import job_ended
from workers.artifacts import ChecksumMismatch, cache_dir, fetch, put_bytes, put_file
from workers.cache import WorkerCache
from workers.device import resolve_device
from workers.heartbeat import Heartbeat, handback_after, send_handed_back, worker_name
from workers.models import layer_json
from workers.params import split_params
from workers.resume import load_state, run_resumed, save_state
from workers.retry import STORE_ERRORS, retry_call, retry_transaction
from storage.statistics import keys_layer, sample_spec
from workers.statistics import ensure_statistic, load_checkpoint, shard_sender

log = logging.getLogger(__name__)

PREVIEW_HELD_OUT = 4  # held-out seeds shown in the preview (the metrics use all of them)
PREVIEW_SIZE = 128  # small generators are enlarged to about this many pixels per image
PROGRESS_INTERVAL = 1.0  # seconds between progress writes (milestones are written at once)


class JobFailed(Exception):
    """The job cannot run as asked; ``code`` and the message go on the job."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Progress:
    """Progress on the job row: milestones at once, other updates at most every ``interval``."""

    def __init__(self, session_factory, lease, interval: float = PROGRESS_INTERVAL, retry_s: float = 0):
        self.session_factory, self.lease, self.interval = session_factory, lease, interval
        self.retry_s = retry_s  # milestones are retried this long while the database is away
        self.last = 0.0

    def milestone(self, phase, step=None, total=None, loss=None):
        retry_call(lambda: self._write(phase, step, total, loss, milestone=True), budget_s=self.retry_s,
                   what=f"job {self.lease.job_id}: progress {phase}")

    def update(self, phase, step=None, total=None, loss=None):
        if time.monotonic() - self.last >= self.interval:
            try:
                self._write(phase, step, total, loss, milestone=False)
            except (OperationalError, InterfaceError) as error:  # advisory: the next update may land
                log.warning("job %s: progress not written (%s)", self.lease.job_id, str(error).splitlines()[0])
                self.last = time.monotonic()

    def _write(self, phase, step, total, loss, milestone):
        loss = loss if loss is None or math.isfinite(loss) else None
        with session_scope(self.session_factory) as session:
            lifecycle.report_progress(session, self.lease, phase, step, total, loss, milestone=milestone)
        self.last = time.monotonic()


@dataclass
class Plan:
    """What the job row asks for, read and checked before any heavy work."""

    job: Job
    model: Model
    request: object  # rewriting.requests.EditRequest, with the job's params applied
    options: object  # workers.params.JobOptions
    base_key: str  # the checkpoint to edit: the model's, or the base job's output
    base_sha256: str


def plan_job(session, job_id: str, default_samples: int) -> Plan:
    job = session.get(Job, job_id)
    model = session.get(Model, job.model_id)
    if model is None or model.status != "ready":
        raise JobFailed("model_not_ready", f"model {job.model_id} is {model.status if model else 'missing'}"
                        + (f": {model.error}" if model is not None and model.error else ""))
    edit_params, options = split_params(job.params, default_samples)
    request = parse_request(job.request, params=edit_params)
    if model.layers:  # known from the model's inspection: fail before loading anything
        check_layer(job.layer, [layer["name"] for layer in model.layers])
    base_key, base_sha256 = model.object_key, model.sha256
    if job.base_job_id is not None:
        base = session.get(Job, job.base_job_id)
        if base is None or base.tenant_id != job.tenant_id or base.status != "succeeded":
            raise EditRequestError("base.job", f"job {job.base_job_id} has not succeeded")
        artifact = session.scalars(select(Artifact).where(Artifact.job_id == base.id,
                                                          Artifact.name == "checkpoint")).one()
        base_key, base_sha256 = artifact.object_key, artifact.sha256
    return Plan(job, model, request, options, base_key, base_sha256)


def process_job(session_factory, store, settings, job_id: str, owner: str | None = None, warm=None,
                send_shard=None, shutdown=None) -> str | None:
    """The body of ``run_job``: run the job if this worker may; its final status, ``queued``
    when it was handed back (the caller sends the task again), or None when this delivery
    did nothing (finished, cancelled before it ran, running elsewhere, or the lease was lost
    on the way). ``warm``: the worker's ``workers.cache.WorkerCache`` (None: load everything
    afresh); ``send_shard``: sends a statistic shard's task; ``shutdown``: the worker's
    ``workers.heartbeat.ShutdownNotice`` (None: never handed back)."""
    ttl = settings.job_lease_seconds
    grace = settings.worker_shutdown_grace_seconds

    lease = retry_transaction(
        session_factory,
        lambda session: lifecycle.claim(session, job_id, owner or worker_name(), ttl,
                                        max_attempts=settings.job_max_attempts),
        budget_s=settings.db_retry_seconds, what=f"job {job_id}: claim")
    if lease is None:
        return None
    with Heartbeat(session_factory, ttl, lease, handback=handback_after(shutdown, grace)) as heartbeat:
        try:
            metrics, uploads = run_claimed(session_factory, store, settings, lease, heartbeat, warm, send_shard)

            def succeed(session):
                for name, stored, content_type in uploads:
                    session.add(Artifact(job_id=job_id, name=name, object_key=stored.key, sha256=stored.sha256,
                                         size=stored.size, content_type=content_type))
                lifecycle.finish(session, lease, "succeeded", metrics=metrics)

            retry_transaction(session_factory, succeed, budget_s=settings.db_retry_seconds,
                              what=f"job {job_id}: finish")
            return "succeeded"
        except lifecycle.LeaseLost:
            return None
        except Cancelled as e:
            if heartbeat.job_lost:
                return None
            if heartbeat.handing_back and not heartbeat.cancel_requested:  # a cancel still wins
                return _hand_back(session_factory, store, settings, lease, grace, e.state)
            return _end(session_factory, settings, lease, "cancelled")
        except JobFailed as e:
            return _end(session_factory, settings, lease, "failed", e.code, str(e))
        except (EngineError, ChecksumMismatch) as e:
            return _end(session_factory, settings, lease, "failed", e.code, str(e))
        except StorageUnavailable as e:
            return _end(session_factory, settings, lease, "failed", "storage_unavailable", str(e))
        except ObjectNotFound as e:
            return _end(session_factory, settings, lease, "failed", "object_missing", f"no object at {e} in the store")
        except (OperationalError, InterfaceError):
            # The database stayed away past the retry budget: the job cannot even be failed.
            # It stays running; its lease expires and the reconciler sends it again.
            log.exception("job %s: database unavailable; left to the reconciler", job_id)
            raise
        except SoftTimeLimitExceeded:
            return _end(session_factory, settings, lease, "failed", "timeout",
                        f"the job ran past the soft time limit ({settings.task_soft_time_limit} s)")
        except Exception as e:
            log.exception("job %s failed unexpectedly", job_id)
            _end(session_factory, settings, lease, "failed", "internal_error", f"{type(e).__name__}: {e}")
            raise


def _end(session_factory, settings, lease, status, code=None, message=None) -> str | None:
    try:
        retry_transaction(
            session_factory, lambda session: lifecycle.finish(session, lease, status, error_code=code,
                                                              error_message=message),
            budget_s=settings.db_retry_seconds, what=f"job {lease.job_id}: {status}")
    except lifecycle.LeaseLost:
        return None
    return status


def _hand_back(session_factory, store, settings, lease, grace, state=None) -> str | None:
    """Release the job (``queued``), its lease cleared, so that another worker can claim it
    as soon as the task is sent again (``run_job`` does that once this is committed).
    ``state``: where its optimizer stood (``rewriting.insert.InsertState``), saved for the
    next claim to go on from (``workers.resume``); a state that cannot be saved is dropped,
    and the job then optimizes from where it last stood (or from the start)."""
    reason = f"its worker was stopping (still running {grace} s after the shutdown began); queued again"
    stored = None
    if state is not None:
        tenant = retry_transaction(session_factory, lambda session: session.scalar(
            select(Job.tenant_id).where(Job.id == lease.job_id)), budget_s=settings.db_retry_seconds,
            what=f"job {lease.job_id}: read")
        stored = save_state(session_factory, store, settings, tenant, state, f"job {lease.job_id}")
    if stored is not None:
        reason += f", to go on from optimizer step {state.step}"
    try:
        retry_transaction(session_factory, lambda session: lifecycle.release(session, lease, reason, resume=stored),
                          budget_s=settings.db_retry_seconds, what=f"job {lease.job_id}: release")
    except lifecycle.LeaseLost:
        if stored is not None:  # no row will name it: for the sweep
            retry_transaction(session_factory, lambda session: record_deleted(session, [stored.key]),
                              budget_s=settings.db_retry_seconds, what=f"job {lease.job_id}: drop resume")
        return None
    log.info("job %s: handed back (the worker is stopping)", lease.job_id)
    return "queued"


def send_again(app, job_id: str) -> None:
    """Send ``run_job`` for a job handed back, at the job's priority. If the broker cannot
    take it, the reconciler re-sends the queued job once its grace period has passed."""
    from workers.celery_app import broker_priority

    def send():
        with session_scope(app.session_factory) as session:
            priority = session.scalar(select(Job.priority).where(Job.id == job_id))
        app.send_task(run_job.name, args=[job_id], priority=broker_priority(priority))

    send_handed_back(send, f"job {job_id}")


def run_claimed(session_factory, store, settings, lease, heartbeat, warm=None, send_shard=None):
    """Load, statistics, optimize, evaluate, upload; (metrics, [(name, StoredObject, type)])."""
    progress = Progress(session_factory, lease, retry_s=settings.db_retry_seconds)
    ended = None  # where the insert ended, once it has: a stop after it hands that back

    def stop(what):
        return Cancelled(f"cancelled {what}", state=ended)

    def phase(name, **fields):
        if heartbeat.should_stop():
            raise stop(f"before {name}")
        progress.milestone(name, **fields)

    plan = retry_transaction(session_factory, lambda session: plan_job(session, lease.job_id, settings.stat_samples),
                             budget_s=settings.db_retry_seconds, what=f"job {lease.job_id}: read")
    request, options, layer = plan.request, plan.options, plan.job.layer

    phase("loading")
    cache = cache_dir(settings.data_dir)
    device = resolve_device(settings.device)
    # from the worker's cache when warm; never modified (see workers/cache.py)
    model = load_checkpoint(store, settings, plan.base_key, plan.base_sha256, warm)
    layers = plan.model.layers
    if not layers:  # else plan_job checked the layer against the inspection (a forward pass saved)
        layers = [layer_json(info) for info in editable_layers(model)]
        check_layer(layer, [info["name"] for info in layers])
    segmenter = None
    if plan.model.segmenter_object_key:
        key = plan.model.segmenter_object_key  # content-addressed: the key names the bytes
        segmenter = (warm or WorkerCache()).model(key, lambda: load_model(fetch(store, key, cache), device=device))
        classes = segmenter_classes(segmenter, options)  # bad class names fail before the long phases

    phase("statistics")
    spec = sample_spec(options.samples)
    moment, statistic = ensure_statistic(
        session_factory, store, cache, model, plan.base_sha256, keys_layer(layers, layer), spec, lease.owner,
        settings.job_lease_seconds, heartbeat,
        progress=lambda done, total: progress.update("statistics", done, total),
        shard_samples=settings.shard_samples, warm=warm, send_shard=send_shard, retry_s=settings.db_retry_seconds)

    steps = request.params.steps
    resume = load_state(store, cache, plan.job.resume_object_key, plan.job.resume_sha256, f"job {lease.job_id}")
    phase("optimizing", step=resume.step if resume else 0, total=steps)

    def on_edit(name, step, loss):
        if name == "insert":
            progress.update("optimizing", step, steps, loss)
        elif name == "done":
            progress.milestone("optimizing", step, steps, loss)

    def edit(resume):
        return run_edit(model, layer, request, moment, params=request.params, progress=on_edit,
                        should_stop=heartbeat.should_stop, base_sha256=plan.base_sha256, resume=resume)

    result, resume = run_resumed(edit, resume, f"job {lease.job_id}")
    ended = result.state

    phase("evaluating")
    metrics, preview = evaluate(model, segmenter, result, request, options,
                                classes if segmenter is not None else None)
    metrics["statistic"] = {"id": statistic.id, "sample_spec": statistic.sample_spec, "count": statistic.count}
    metrics["resumed_from_step"] = resume.step if resume else 0

    phase("uploading")
    if pause_for_tests(settings.test_slow_upload_seconds, heartbeat):
        raise stop("while uploading")
    tenant = plan.job.tenant_id
    body = json.dumps(metrics, sort_keys=True, indent=2).encode()

    def upload(put, source, kind, name, *rest):  # rest: content type (and a put_file's known sha256)
        # content-addressed: an upload tried again writes the same bytes to the same key
        try:
            return retry_call(lambda: put(session_factory, store, source, tenant, kind, name, *rest,
                                          db_retry_s=settings.db_retry_seconds),
                              budget_s=settings.storage_retry_seconds, errors=STORE_ERRORS,
                              give_up=heartbeat.should_stop, what=f"job {lease.job_id}: upload {kind}")
        except STORE_ERRORS:
            if heartbeat.should_stop():  # it stopped waiting for the store: cancelled, or handed back
                raise stop(f"while uploading {kind}") from None
            raise

    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        checkpoint = Path(tmp) / "model.safetensors"
        # fetch verified the base against plan.base_sha256, and materialize hashes what it
        # wrote: a 14 MB checkpoint is hashed twice (here and by the store), not four times
        checkpoint_sha256 = materialize(fetch(store, plan.base_key, cache, plan.base_sha256), [result.delta],
                                        checkpoint, base_sha256=plan.base_sha256)
        uploads = [
            ("delta", upload(put_bytes, result.delta.to_bytes(), "delta", "delta.safetensors"),
             "application/octet-stream"),
            ("checkpoint", upload(put_file, checkpoint, "checkpoint", "model.safetensors",
                                  "application/octet-stream", checkpoint_sha256), "application/octet-stream"),
            ("preview", upload(put_bytes, preview, "preview", "preview.png", "image/png"), "image/png"),
            ("metrics", upload(put_bytes, body, "metrics", "metrics.json", "application/json"),
             "application/json"),
        ]
    return metrics, uploads


def pause_for_tests(seconds: int, heartbeat) -> bool:
    """PALIMPSEST_TEST_SLOW_UPLOAD_SECONDS (0 by default: nothing): hold the uploading phase
    open so that the reliability tests can kill a worker or take the store down during it.
    A cancel or a hand-back still ends it at once: True then."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if heartbeat.should_stop():
            return True
        time.sleep(0.1)
    return False


# --- evaluation -------------------------------------------------------------------------------

def segmenter_classes(segmenter, options) -> list:
    """The segmenter's class names (``classes`` attribute, else indices as strings), after
    checking the class names the job's options give."""
    names = [str(c) for c in getattr(segmenter, "classes", ())] or None
    for field in ("source_class", "target_class"):
        value = getattr(options, field)
        if value is not None and (names is None or value not in names):
            raise EditRequestError(f"params.{field}", f"must be one of the segmenter's classes {names}, "
                                                      f"not {value!r}")
    return names or []


def region_class(model, segmenter, region, exclude=None) -> int:
    """The segmenter class that ``region`` is about: the one most enriched inside its mask
    relative to its whole image (its term of the KL divergence between the two class
    histograms). A box around a thin spire holds more sky than spire, but sky fills the
    rest of the image too, while nearly all of the spire is inside the box."""
    labels, _ = segment(segmenter, generate(model, [region.seed]))
    weights = torch.from_numpy(mask_at(region.mask, tuple(labels.shape[1:]))).flatten().double()
    labels = labels.flatten()
    count = int(labels.max()) + 1
    inside = torch.bincount(labels, weights=weights, minlength=count)
    inside = inside / inside.sum()
    whole = torch.bincount(labels, minlength=count).double() / labels.numel()
    score = inside * torch.log((inside + 1e-2) / (whole + 1e-2))
    if exclude is not None and exclude < count and count > 1:
        score[exclude] = -float("inf")
    return int(score.argmax())


def _finite(x):
    return x if x is None or not isinstance(x, float) or math.isfinite(x) else None


def evaluate(model, segmenter, result, request, options, classes) -> tuple[dict, bytes]:
    """(metrics, preview PNG) of the edit, on held-out seeds (never used by the request).

    Always: the constraint loss before and after, and ``held_out_change``, the mean
    absolute pixel change on held-out images (scale [0, 1]). With a segmenter, also the
    paper's metrics (``rewriting.metrics.edit_metrics``) for the source and target classes.
    Preview: the copy source (if any), the paste target and a few held-out seeds, before
    (top row) and after (bottom row).
    """
    seeds = held_out_seeds(request, options.held_out)
    edited = copy.deepcopy(model)  # one generator before, one after: the metrics compare both
    with applied(edited, [result.delta]):
        shown = ([request.copy.seed] if request.copy else []) + [request.paste.seed] + seeds[:PREVIEW_HELD_OUT]
        before, after = generate(model, shown), generate(edited, shown)
        held_before, held_after = generate(model, seeds), generate(edited, seeds)
        metrics = {
            "layer": result.delta.layer, "operation": request.operation, "steps": result.steps,
            "stopped_early": result.stopped_early, "seconds": round(result.seconds, 3),
            "initial_loss": _finite(result.initial_loss), "constraint_loss": _finite(result.constraint_loss),
            "held_out_seeds": seeds,
            "held_out_change": _finite(((held_after - held_before).abs().mean() / 2).item()),
            "segmenter": None,
        }
        if segmenter is not None:
            index = {name: i for i, name in enumerate(classes)}
            source = (index[options.source_class] if options.source_class
                      else region_class(model, segmenter, request.paste))
            target = None
            if options.target_class:
                target = index[options.target_class]
            elif request.copy is not None:
                target = region_class(model, segmenter, request.copy, exclude=source)
            m = edit_metrics(model, edited, segmenter, seeds, source, target, request=request)
            name = (lambda i: None if i is None else classes[i] if i < len(classes) else str(i))
            metrics["segmenter"] = {
                "source_class": name(source), "target_class": name(target), "source_pixels": m.source_pixels,
                "edit_success": _finite(m.edit_success), "unwanted_pixel_change": _finite(m.unwanted_pixel_change),
                "unwanted_feature_distance": _finite(m.unwanted_feature_distance)}
    scale = max(1, PREVIEW_SIZE // before.shape[-1])
    preview = image_grid(torch.cat([before, after]), columns=len(shown), scale=scale)
    return metrics, preview


class JobRequest(Request):
    """A ``run_job`` delivery, as the worker's parent process sees it.

    At the hard time limit the pool kills the child process running the job, which
    cannot record anything itself. Here, in the parent, the job is failed ``timeout``,
    once: only while it is still running under the killed process's lease (its owner
    name, ``host:pid``), so a job another worker took over meanwhile is left alone. A
    short-lived engine is used: the parent forks new children, which must not inherit
    its connections.
    """

    def on_timeout(self, soft, timeout):
        super().on_timeout(soft, timeout)
        if soft or not self.args or self.worker_pid is None:
            return
        from sqlalchemy.pool import NullPool

        from storage.db import make_engine, make_session_factory

        job_id, settings = self.args[0], self.task.app.settings
        owner = worker_name(self.worker_pid)
        engine = make_engine(settings.database_url, poolclass=NullPool)
        try:
            def fail():
                with session_scope(make_session_factory(engine)) as session:
                    return lifecycle.fail_abandoned(
                        session, job_id, "timeout", f"the job ran past the hard time limit ({timeout} s); "
                        f"its process {owner} was killed", owner=owner)

            # briefly: this blocks the parent's event loop (past it, the reconciler's max attempts apply)
            if retry_call(fail, budget_s=5, what=f"job {job_id}: timeout"):
                # a delivery that finds the job ended runs its end hooks (webhook, batch counts)
                self.task.app.send_task(self.task.name, args=[job_id])
        except Exception:
            log.exception("job %s: could not record the hard time limit", job_id)
        finally:
            engine.dispose()


@shared_task(bind=True, name="workers.jobs.run_job", Request=JobRequest)
def run_job(self, job_id: str) -> None:
    """Run one edit job (see the module doc). Queue ``gpu``; safe to deliver twice."""
    try:
        status = process_job(self.app.session_factory, self.app.store, self.app.settings, job_id,
                             warm=self.app.cache, send_shard=shard_sender(self.app),
                             shutdown=self.app.shutdown_notice)
        if status == "queued":  # handed back by a worker that is stopping: for another worker, now
            send_again(self.app, job_id)
    finally:
        job_ended(self.app, job_id)  # the job's webhook and its batch's counts (workers/batches.py)
