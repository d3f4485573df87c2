"""Edit jobs: submit (validated in full before anything is queued), list, show, cancel,
their events, and their artifacts.

A job is inserted as ``queued`` through ``storage.lifecycle`` (the one place that moves
jobs between states), committed, and only then is ``workers.jobs.run_job(job_id)``
sent. Validation uses the engine's torch-free front end (``rewriting.requests``), so a
request the worker would refuse is refused here, with the field to blame.

Every query is scoped to the caller's tenant: another tenant's job answers 404.
"""
import hashlib
import json
from dataclasses import asdict, replace

from flask import Blueprint, Response, current_app, redirect, request, url_for
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.auth import current_tenant_id
from api.errors import (
    ApiError,
    ArtifactNotFound,
    IdempotencyMismatch,
    InvalidEditRequest,
    JobFinished,
    JobNotFinished,
    JobNotFound,
    UnknownLayer,
    ValidationError,
)
from api import pagination
from api.deletion import committed
from api.inputs import bounded_int, json_body, json_problem, known_only
from api.models import ReadyModel, forget_model, ready_model
from api.openapi import SECURED, error_responses
from api.pagination import PAGE_ARGS, page
from api.tasks import DEFAULT_PRIORITY, MAX_PRIORITY, RUN_JOB, send_task
from palimpsest.webhooks import url_problem
from rewriting.errors import EditRequestError
from rewriting.errors import UnknownLayer as EngineUnknownLayer
from rewriting.requests import check_layer, check_rank, parse_request
from storage import deletion, lifecycle
from storage.db import get_session
from storage.models import ARTIFACT_NAMES, JOB_PHASES, JOB_STATUSES, Artifact, Job, JobEvent
from storage.objects import CHUNK_SIZE, ObjectNotFound
from storage import resources
from storage.resources import iso_time
from workers.params import split_params

bp = Blueprint("jobs", __name__, url_prefix="/v1")

JOB_FIELDS = ("model", "layer", "request", "params", "base", "priority", "webhook")
LIST_FILTERS = ("status", "model", "batch", *PAGE_ARGS)
MAX_IDEMPOTENCY_KEY = 200  # Job.idempotency_key
MAX_WEBHOOK_URL = 2048  # Job.webhook_url
MAX_SEQ = 2**31 - 1  # JobEvent.seq is a 32-bit integer on PostgreSQL


def get_job(job_id: str) -> Job:
    job = get_session().scalar(select(Job).where(Job.id == job_id, Job.tenant_id == current_tenant_id()))
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    return job


def artifact_url(artifact: Artifact) -> str:
    return url_for("jobs.download_artifact", job_id=artifact.job_id, name=artifact.name, _external=True)


def job_json(job: Job, artifacts: list[Artifact]) -> dict:
    return resources.job_json(job, artifacts, artifact_url, current_app.config["PALIMPSEST_RETENTION_SECONDS"])


def artifacts_of(job_ids: list[str]) -> dict[str, list[Artifact]]:
    found = {job_id: [] for job_id in job_ids}
    if job_ids:
        for artifact in get_session().scalars(select(Artifact).where(Artifact.job_id.in_(job_ids))):
            found[artifact.job_id].append(artifact)
    return found


def show(job: Job) -> dict:
    return job_json(job, artifacts_of([job.id])[job.id])


# -- submission ------------------------------------------------------------------------

def request_hash(body) -> str:
    """The body's identity for Idempotency-Key: sha256 of its canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _prefixed(prefix: str, field: str) -> str:
    # the engine calls the whole object "request" already
    return prefix if not field or field == prefix else f"{prefix}.{field}"


def validate_job(body, tenant_id: str) -> dict:
    """Check every field of a submission; return the Job columns it asks for.

    Raises a 422 ``ValidationError`` (or subclass) naming the field, or 409
    ``ModelNotReady``. Nothing is written.
    """
    known_only(body, JOB_FIELDS, "field")
    if (problem := json_problem(body)) is not None:  # a batch line is not a request body: check it here too
        raise ValidationError(problem[1], field=problem[0])

    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise ValidationError("is required: the id of a model (GET /v1/models)", field="model")
    model = ready_model(model_id, tenant_id)

    if "request" not in body:
        raise InvalidEditRequest("is required: the edit (native or original rewriting format)", field="request")
    try:
        edit = parse_request(body["request"])
    except EditRequestError as error:
        raise InvalidEditRequest(error.message, field=_prefixed("request", error.field)) from None
    try:
        # the edit's hyperparameters (over the request's own) and the job's options (samples, ...)
        edit_params, options = split_params(body.get("params"), current_app.config["PALIMPSEST_STAT_SAMPLES"])
        edit = parse_request(body["request"], edit_params)
    except EditRequestError as error:
        raise InvalidEditRequest(error.message, field=error.field) from None

    layer = body.get("layer", edit.layer)
    if not isinstance(layer, str) or not layer:
        raise ValidationError("is required: the name of an editable layer of the model", field="layer")
    if edit.layer is not None and edit.layer != layer:
        raise InvalidEditRequest(f"names layer {edit.layer!r} but the job's layer is {layer!r}", field="request.layer")
    layers = {info["name"]: info for info in model.layers}
    try:
        check_layer(layer, list(layers))
    except EngineUnknownLayer as error:
        raise UnknownLayer(str(error), field="layer") from None
    info = layers[layer]
    try:
        check_rank(edit, tuple(info["key_size"]) if info.get("key_size") else None, info["key_channels"])
    except EditRequestError as error:
        raise InvalidEditRequest(error.message, field=error.field) from None
    edit = replace(edit, layer=layer)

    base_job_id = None
    if body.get("base") is not None:
        base_job_id = validate_base(body["base"], tenant_id, model)

    priority = body.get("priority", DEFAULT_PRIORITY)
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise ValidationError(f"must be an integer in [0, {MAX_PRIORITY}] (higher runs sooner), not {priority!r}",
                              field="priority")

    webhook = body.get("webhook")
    if webhook is not None:
        validate_webhook(webhook)

    # Stored resolved, so that the job runs as validated even if server defaults change.
    params = {**edit.params.to_json(), **{k: v for k, v in asdict(options).items() if v is not None}}
    return dict(model_id=model.id, layer=layer, request=edit.to_json(), params=params,
                base_job_id=base_job_id, priority=priority, webhook_url=webhook)


def validate_base(base, tenant_id: str, model: ReadyModel) -> str:
    """A chained edit starts from a succeeded job of this tenant on the same model."""
    if not isinstance(base, dict) or set(base) != {"job"} or not isinstance(base["job"], str):
        raise ValidationError('must be {"job": "<id of a succeeded job>"}', field="base")
    base_job = get_session().scalar(select(Job).where(Job.id == base["job"], Job.tenant_id == tenant_id))
    if base_job is None:
        raise ValidationError(f"no job {base['job']!r}", field="base.job")
    if base_job.status != "succeeded":
        raise ValidationError(f"job {base_job.id} is {base_job.status}; only a succeeded job's output can be a base",
                              field="base.job")
    if base_job.model_id != model.id:
        raise ValidationError(f"job {base_job.id} edited model {base_job.model_id}; a chained edit must use the "
                              f"same model, not {model.id}", field="base.job")
    return base_job.id


def validate_webhook(url) -> None:
    """An http(s) URL on a host of PALIMPSEST_WEBHOOK_ALLOWED_HOSTS (empty: none); the
    sender checks again before each delivery (palimpsest/webhooks.py)."""
    problem = url_problem(url, current_app.config["PALIMPSEST_WEBHOOK_ALLOWED_HOSTS"])
    if problem is not None:
        raise ValidationError(problem, field="webhook")


def idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= MAX_IDEMPOTENCY_KEY and key.isprintable()):
        raise ValidationError(f"must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters", field="Idempotency-Key")
    return key


def replay(job: Job, body_hash: str):
    """The answer to a repeated Idempotency-Key: the same job, if the body is the same."""
    if job.request_hash != body_hash:
        raise IdempotencyMismatch(f"this Idempotency-Key was used for job {job.id} with a different body",
                                  field="Idempotency-Key")
    return show(job), 200, {"Location": f"/v1/jobs/{job.id}", "Idempotent-Replayed": "true"}


@bp.post("/jobs")
def submit_job():
    body = json_body()
    tenant_id = current_tenant_id()
    key = idempotency_key()
    body_hash = request_hash(body)
    session = get_session()

    def existing():
        return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))

    if key is not None and (job := existing()) is not None:
        return replay(job, body_hash)
    columns = validate_job(body, tenant_id)
    try:
        job = lifecycle.create_job(session, tenant_id=tenant_id, idempotency_key=key, request_hash=body_hash,
                                   **columns)
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first: answer as if we came second.
        session.rollback()
        if key is not None and (job := existing()) is not None:
            return replay(job, body_hash)
        # Else the model or the base job was deleted since it was validated (another API
        # process may still hold the model as ready): validating again names the field.
        forget_model(columns["model_id"])
        validate_job(body, tenant_id)
        raise
    try:
        send_task(RUN_JOB, job.id, priority=job.priority)
    except ApiError:
        # The job can never run without its message: fail it so that nobody waits on it,
        # and free its Idempotency-Key, so that a retry the 503 invites queues the edit.
        lifecycle.fail_unclaimed(session, job, "queue_unavailable", "the job could not be queued")
        job.idempotency_key = None
        session.commit()
        raise
    return job_json(job, []), 202, {"Location": f"/v1/jobs/{job.id}"}  # a new job has no artifacts: no SELECT


# -- reading ---------------------------------------------------------------------------

@bp.get("/jobs")
def list_jobs():
    """Newest first; ``next_cursor`` is null on the last page."""
    args = request.args
    known_only(args, LIST_FILTERS)
    query = select(Job).where(Job.tenant_id == current_tenant_id())
    if (status := args.get("status")) is not None:
        if status not in JOB_STATUSES:
            raise ValidationError(f"must be one of {', '.join(JOB_STATUSES)}", field="status")
        query = query.where(Job.status == status)
    if (model_id := args.get("model")) is not None:
        query = query.where(Job.model_id == model_id)
    if (batch_id := args.get("batch")) is not None:
        query = query.where(Job.batch_id == batch_id)
    jobs, next_cursor = page(query, Job, args)
    artifacts = artifacts_of([job.id for job in jobs])
    return {"jobs": [job_json(job, artifacts[job.id]) for job in jobs], "next_cursor": next_cursor}


@bp.get("/jobs/<job_id>")
def show_job(job_id):
    return show(get_job(job_id))


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id):
    """A queued job is cancelled at once and never runs; a running one is asked to stop
    (``cancel_requested``) and stops at its next step; a finished one answers 409."""
    session = get_session()
    job = get_job(job_id)
    try:
        job = lifecycle.request_cancel(session, job.id)
        session.commit()
    except lifecycle.IllegalTransition as error:
        session.rollback()
        raise JobFinished(f"job {job_id} is {error.current}; only a queued or running job can be cancelled") from None
    return show(job)


@bp.delete("/jobs/<job_id>")
def delete_job(job_id):
    """An ended job, with its events and artifacts (their objects go after the deletion grace
    period, storage.deletion); 409 while it runs, belongs to a batch or is another job's base."""
    job = get_job(job_id)
    with committed(f"job {job.id}", JobNotFinished) as session:
        deletion.delete_job(session, job)
    return "", 204


@bp.get("/jobs/<job_id>/events")
def job_events(job_id):
    """Every transition and progress milestone, by ``seq``; ``after`` skips those already seen."""
    job = get_job(job_id)
    known_only(request.args, ("after",))
    after = bounded_int(request.args.get("after", "0"), 0, MAX_SEQ, "after", " (the last seq seen)")
    events = get_session().scalars(
        select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.seq > after).order_by(JobEvent.seq))
    return {"events": [{
        "seq": e.seq, "kind": e.kind, "status": e.status, "phase": e.phase, "step": e.step, "total": e.total,
        "loss": e.loss, "message": e.message, "created_at": iso_time(e.created_at),
    } for e in events]}


@bp.get("/jobs/<job_id>/artifacts/<name>")
def download_artifact(job_id, name):
    """S3: a redirect to a presigned URL. File store: the file, streamed in chunks."""
    job = get_job(job_id)
    artifact = get_session().scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if artifact is None:
        raise ArtifactNotFound(f"job {job.id} has no artifact {name!r}"
                               + ("" if name in ARTIFACT_NAMES else f"; artifacts are named {', '.join(ARTIFACT_NAMES)}"))
    store = current_app.extensions["palimpsest_store"]
    url = store.url(artifact.object_key, expires_in=current_app.config["PALIMPSEST_PRESIGN_SECONDS"])
    if url is not None:
        return redirect(url, 302)
    etag = f'"{artifact.sha256}"'
    if request.if_none_match.contains_weak(artifact.sha256):  # If-None-Match compares weakly (RFC 9110)
        return Response(status=304, headers={"ETag": etag})
    try:
        stream = store.open(artifact.object_key)
    except ObjectNotFound:
        current_app.logger.error("artifact %s of job %s is missing from the store", name, job.id)
        raise ArtifactNotFound(f"job {job.id}'s artifact {name!r} is missing from the store") from None

    def chunks():
        with stream:
            while chunk := stream.read(CHUNK_SIZE):
                yield chunk

    filename = artifact.object_key.rsplit("/", 1)[-1]
    return Response(chunks(), mimetype=artifact.content_type or "application/octet-stream", headers={
        "Content-Length": str(artifact.size),
        "ETag": etag,
        "Content-Disposition": f'attachment; filename="{filename}"',
    })


def _nullable(schema: dict) -> dict:
    return {"oneOf": [schema, {"type": "null"}]}


_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
_JOB = {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}
_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "/v1/jobs/{id}"}}

OPENAPI_SCHEMAS = {
    "JobSubmission": {
        "type": "object",
        "properties": {
            "model": {"type": "string", "description": "A ready model's id (GET /v1/models)"},
            "layer": {"type": "string", "description": "An editable layer of the model; may instead be given as "
                                                       "request.layer"},
            "request": {"type": "object", "description": "The edit, in the native format or the original rewriting "
                                                         "app's format (docs/requests.md)"},
            "params": {"type": "object", "description": "Hyperparameters over the request's own (rank, lr, steps, "
                                                        "method, ...) and job options (samples, held_out, "
                                                        "source_class, target_class)"},
            "base": {"type": "object", "properties": {"job": {"type": "string"}}, "required": ["job"],
                     "additionalProperties": False,
                     "description": "Start from the output of this succeeded job of yours, on the same model"},
            "priority": {"type": "integer", "minimum": 0, "maximum": MAX_PRIORITY, "default": DEFAULT_PRIORITY,
                         "description": "Higher runs sooner"},
            "webhook": {"type": "string", "format": "uri", "maxLength": MAX_WEBHOOK_URL,
                        "description": "http(s) URL told of the job's end"},
        },
        "required": ["model", "request"],
        "additionalProperties": False,
    },
    "Artifact": {
        "type": "object",
        "properties": {
            "name": {"enum": list(ARTIFACT_NAMES)},
            "sha256": {"type": "string"},
            "size": {"type": "integer"},
            "content_type": {"type": ["string", "null"]},
            "url": {"type": "string", "description": "GET it: a redirect to the object store, or the file itself"},
        },
        "required": ["name", "sha256", "size", "content_type", "url"],
    },
    "Job": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": list(JOB_STATUSES)},
            "model": {"type": "string"},
            "layer": {"type": "string"},
            "progress": {
                "type": "object",
                "properties": {
                    "phase": _nullable({"enum": list(JOB_PHASES)}),
                    "step": {"type": ["integer", "null"]},
                    "total": {"type": ["integer", "null"]},
                    "loss": {"type": ["number", "null"]},
                },
                "required": ["phase", "step", "total", "loss"],
            },
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": _nullable({"type": "string", "format": "date-time"}),
            "finished_at": _nullable({"type": "string", "format": "date-time"}),
            "expires_at": _nullable({"type": "string", "format": "date-time",
                                     "description": "When retention (PALIMPSEST_RETENTION_SECONDS) deletes the "
                                                    "ended job, at the earliest; null: not ended, no retention, "
                                                    "or a batch member (it goes with its batch)"}),
            "error": _nullable({"type": "object", "properties": {"code": {"type": "string"},
                                                                 "message": {"type": "string"}},
                                "required": ["code", "message"]}),
            "metrics": {"type": ["object", "null"]},
            "artifacts": {"type": "array", "items": {"$ref": "#/components/schemas/Artifact"}},
            "base_job": {"type": ["string", "null"]},
            "priority": {"type": "integer"},
            "batch": {"type": ["string", "null"]},
            "params": {"type": "object", "description": "The hyperparameters and options the job runs with"},
            "webhook": {"type": ["string", "null"]},
            "cancel_requested": {"type": "boolean"},
        },
        "required": ["id", "status", "model", "layer", "progress", "created_at", "started_at", "finished_at",
                     "expires_at", "error", "metrics", "artifacts", "base_job", "priority", "batch", "params", "webhook",
                     "cancel_requested"],
    },
    "JobList": {
        "type": "object",
        "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
            "next_cursor": {"type": ["string", "null"], "description": "Pass as cursor for the next page; null on "
                                                                       "the last"},
        },
        "required": ["jobs", "next_cursor"],
    },
    "JobEvent": {
        "type": "object",
        "properties": {
            "seq": {"type": "integer"},
            "kind": {"enum": ["transition", "progress"]},
            "status": {"type": ["string", "null"]},
            "phase": {"type": ["string", "null"]},
            "step": {"type": ["integer", "null"]},
            "total": {"type": ["integer", "null"]},
            "loss": {"type": ["number", "null"]},
            "message": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
        },
        "required": ["seq", "kind", "status", "phase", "step", "total", "loss", "message", "created_at"],
    },
    "JobEvents": {
        "type": "object",
        "properties": {"events": {"type": "array", "items": {"$ref": "#/components/schemas/JobEvent"}}},
        "required": ["events"],
    },
}

OPENAPI_PATHS = {
    "/v1/jobs": {
        "post": {
            "operationId": "submitJob",
            "tags": ["jobs"],
            "summary": "Submit an edit. Everything is validated before it is queued (422 names the field).",
            "security": SECURED,
            "parameters": [{
                "name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
                "description": "The same key and body return the same job (200); the same key with another body "
                               "answers 422 idempotency_mismatch",
            }],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/JobSubmission"}}}},
            "responses": {
                "202": {"description": "Queued", "headers": _LOCATION, "content": _JOB},
                "200": {"description": "An earlier submission with this Idempotency-Key and body",
                        "headers": {**_LOCATION, "Idempotent-Replayed": {"schema": {"const": "true"}}},
                        "content": _JOB},
                **error_responses(400, 401, 409, 413, 422),
            },
        },
        "get": {
            "operationId": "listJobs",
            "tags": ["jobs"],
            "summary": "The tenant's jobs, newest first, a page at a time",
            "security": SECURED,
            "parameters": [
                {"name": "status", "in": "query", "schema": {"enum": list(JOB_STATUSES)}},
                {"name": "model", "in": "query", "schema": {"type": "string"}},
                {"name": "batch", "in": "query", "schema": {"type": "string"}},
                *pagination.OPENAPI_PARAMETERS,
            ],
            "responses": {
                "200": {"description": "A page",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobList"}}}},
                **error_responses(401, 422),
            },
        },
    },
    "/v1/jobs/{job_id}": {
        "get": {
            "operationId": "getJob",
            "tags": ["jobs"],
            "summary": "Status, progress, timestamps, error, metrics and artifacts",
            "security": SECURED,
            "parameters": [_JOB_ID],
            "responses": {"200": {"description": "The job", "content": _JOB}, **error_responses(401, 404)},
        },
        "delete": {
            "operationId": "deleteJob",
            "tags": ["jobs"],
            "summary": "Delete an ended job with its events and artifacts (objects leave the store after "
                       "PALIMPSEST_DELETION_GRACE_SECONDS). 409 job_not_finished while it is queued or running "
                       "(cancel it first), 409 in_use while it belongs to a batch or another job starts from it",
            "security": SECURED,
            "parameters": [_JOB_ID],
            "responses": {"204": {"description": "Deleted"}, **error_responses(401, 404, 409)},
        },
    },
    "/v1/jobs/{job_id}/cancel": {
        "post": {
            "operationId": "cancelJob",
            "tags": ["jobs"],
            "summary": "Cancel: a queued job never runs; a running one stops at its next step (cancel_requested); "
                       "a finished one answers 409 job_finished",
            "security": SECURED,
            "parameters": [_JOB_ID],
            "responses": {"200": {"description": "The job after the request", "content": _JOB},
                          **error_responses(401, 404, 409)},
        }
    },
    "/v1/jobs/{job_id}/events": {
        "get": {
            "operationId": "listJobEvents",
            "tags": ["jobs"],
            "summary": "Every state transition and progress milestone, in order",
            "security": SECURED,
            "parameters": [_JOB_ID, {"name": "after", "in": "query",
                                     "schema": {"type": "integer", "minimum": 0, "maximum": MAX_SEQ},
                                     "description": "Only events with a larger seq"}],
            "responses": {
                "200": {"description": "Events by seq",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobEvents"}}}},
                **error_responses(401, 404, 422),
            },
        }
    },
    "/v1/jobs/{job_id}/artifacts/{name}": {
        "get": {
            "operationId": "downloadArtifact",
            "tags": ["jobs"],
            "summary": "An artifact: a redirect to a presigned URL (S3), or the file streamed (file store)",
            "security": SECURED,
            "parameters": [_JOB_ID, {"name": "name", "in": "path", "required": True,
                                     "schema": {"type": "string"}, "description": ", ".join(ARTIFACT_NAMES)}],
            "responses": {
                "200": {"description": "The file", "headers": {
                    "ETag": {"schema": {"type": "string"}, "description": "The quoted sha256"},
                    "Content-Length": {"schema": {"type": "integer"}}},
                    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                                "image/png": {"schema": {"type": "string", "format": "binary"}},
                                "application/json": {"schema": {}}}},
                "302": {"description": "Presigned object store URL (expires after PALIMPSEST_PRESIGN_SECONDS)",
                        "headers": {"Location": {"schema": {"type": "string"}}}},
                "304": {"description": "If-None-Match matched the sha256"},
                **error_responses(401, 404),
            },
        }
    },
}
