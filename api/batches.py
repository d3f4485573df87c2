"""Batches: many edits submitted as one JSONL file, accepted whole or refused whole.

``POST /v1/batches`` takes the lines as the body (``application/jsonl`` or
``application/x-ndjson``) or as the ``file`` part of a ``multipart/form-data`` upload.
Each line is ``{custom_id, model, layer, request, params}``. Options for the whole batch
(``merge``, ``webhook``, ``priority``) come as query parameters, or as form fields of
the upload. Every line is checked with ``api.jobs.validate_job`` (what ``POST /v1/jobs``
runs) before anything is written: one bad line refuses the batch, with every bad line's
number, field and reason in ``error.details``. An accepted batch and all its member jobs
are inserted in one transaction (``validating -> in_progress``), committed, and only
then are the members' tasks sent, over one broker connection.

What happens next (counts, finalizing, completion, webhooks) is ``workers.batches``.
Every query is scoped to the caller's tenant: another tenant's batch answers 404.
"""
import io
import json
from datetime import timedelta

from flask import Blueprint, Response, current_app, redirect, request, stream_with_context, url_for
from kombu.exceptions import OperationalError
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from werkzeug.http import parse_options_header

from api.auth import current_tenant_id
from api.errors import (
    ApiError,
    BadRequest,
    BatchFinished,
    BatchNotFinished,
    ArtifactNotFound,
    BatchNotFound,
    InvalidBatch,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationError,
)
from api import pagination
from api.deletion import committed
from api.inputs import bounded_int, known_only
from api.jobs import MAX_WEBHOOK_URL, artifact_url, validate_job, validate_webhook
from api.models import forget_model
from api.multipart import MultipartReader
from api.pagination import PAGE_ARGS, page
from api.openapi import SECURED, error_responses
from api.tasks import DEFAULT_PRIORITY, MAX_PRIORITY, RUN_JOB, broker_priority
from storage import deletion, lifecycle
from storage.db import get_session
from storage.models import (
    BATCH_MERGE_STATUSES, BATCH_STATUSES, JOB_STATUSES, Artifact, Batch, BatchMerge, Job, new_id,
    utcnow,
)
from storage.objects import CHUNK_SIZE, ObjectNotFound, tenant_key
from storage.resources import artifacts_json, batch_json
from workers.batches import OPEN_JOB_STATUSES, fail_batch, refresh_batch, set_status

bp = Blueprint("batches", __name__, url_prefix="/v1")

JSONL_TYPES = ("application/jsonl", "application/x-ndjson")
LINE_FIELDS = ("custom_id", "model", "layer", "request", "params")
OPTIONS = ("merge", "webhook", "priority")
# Members queue below interactive jobs (DEFAULT_PRIORITY), so a single job overtakes them.
DEFAULT_BATCH_PRIORITY = 2
MAX_CUSTOM_ID = 200  # Job.custom_id
MAX_DETAILS = 1000  # bad lines listed in one refusal; the message gives the full count
MAX_FIELD_BYTES = 4096  # a multipart option field
MULTIPART_SLACK = 64 * 1024  # part headers and option fields around the file, over PALIMPSEST_BATCH_MAX_BYTES
READ_CHUNK = 1024 * 1024
RESULTS_PAGE = 500  # members read per query while streaming results
CANCEL_CHUNK = 500  # members cancelled per transaction
LIST_FILTERS = ("status", "model", *PAGE_ARGS)
MERGE_OBJECTS = {"delta": "application/octet-stream", "checkpoint": "application/octet-stream",
                 "report": "application/json"}  # a merge's files (workers/merge.py), by name


def get_batch(batch_id: str) -> Batch:
    batch = get_session().scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == current_tenant_id())
                                 .execution_options(populate_existing=True))
    if batch is None:
        raise BatchNotFound(f"no batch {batch_id!r}")
    return batch


def batch_view(batch: Batch) -> dict:
    return batch_json(batch, current_app.config["PALIMPSEST_RETENTION_SECONDS"])


# -- reading the submission -------------------------------------------------------------

def read_limited(stream, limit: int) -> bytes:
    """All of ``stream``, refused with 413 past ``limit`` bytes (memory: at most the limit)."""
    data = bytearray()
    while chunk := stream.read(READ_CHUNK):
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(f"the batch is over the limit of {limit} bytes (PALIMPSEST_BATCH_MAX_BYTES)")
    return bytes(data)


def read_submission() -> tuple[dict, bytes, str]:
    """(options, the JSONL bytes, the name of what held them: ``body`` or ``file``)."""
    limit = current_app.config["PALIMPSEST_BATCH_MAX_BYTES"]
    mimetype, header_options = parse_options_header(request.headers.get("Content-Type", ""))
    options = dict(request.args)
    known_only(options, OPTIONS)
    if mimetype in JSONL_TYPES:
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"the batch is {request.content_length} bytes, over the limit of {limit} bytes "
                                  "(PALIMPSEST_BATCH_MAX_BYTES)")
        request.max_content_length = limit + 1  # the app-wide limit is for JSON bodies; read_limited says 413
        return options, read_limited(request.stream, limit), "body"
    if mimetype != "multipart/form-data":
        raise UnsupportedMediaType(f"send the lines as {' or '.join(JSONL_TYPES)}, or upload them as the file "
                                   "part of multipart/form-data")
    if not header_options.get("boundary"):
        raise BadRequest("multipart/form-data without a boundary")
    if request.content_length is not None and request.content_length > limit + MULTIPART_SLACK:
        raise PayloadTooLarge(f"the upload is {request.content_length} bytes, over the limit of {limit} bytes "
                              "(PALIMPSEST_BATCH_MAX_BYTES) and its form fields")
    request.max_content_length = limit + MULTIPART_SLACK
    data = None
    for part in MultipartReader(request.stream, header_options["boundary"]):
        if part.name == "file":
            if data is not None:
                raise ValidationError("given twice", field="file")
            data = read_limited(part, limit)
        elif part.name in OPTIONS:
            if part.name in options:
                raise ValidationError("given twice (as a form field and a query parameter, or twice)",
                                      field=part.name)
            options[part.name] = part.read_text(MAX_FIELD_BYTES)
        else:
            raise ValidationError(f"unknown form field; expected file, {', '.join(OPTIONS)}", field=part.name)
    if data is None:
        raise ValidationError("is required: the JSONL file of edits", field="file")
    return options, data, "file"


def batch_options(options: dict) -> dict:
    """Batch columns from the options (strings, from a query or form): merge, webhook, priority."""
    merge = options.get("merge", "false").lower()
    if merge not in ("true", "false", "1", "0"):
        raise ValidationError(f"must be true or false, not {options['merge']!r}", field="merge")
    priority = bounded_int(options.get("priority", str(DEFAULT_BATCH_PRIORITY)), 0, MAX_PRIORITY, "priority",
                           f" (higher runs sooner; single jobs default to {DEFAULT_PRIORITY})")
    webhook = options.get("webhook")
    if webhook is not None:
        validate_webhook(webhook)
    return dict(merge=merge in ("true", "1"), priority=priority, webhook_url=webhook)


def split_lines(data: bytes, max_lines: int, source: str) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line; too many lines is refused at the first one over."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InvalidBatch("the batch is not UTF-8 text", field=source,
                           details=[{"line": line, "field": None, "message": f"not UTF-8: {error.reason}"}]) from None
    lines = []
    # "\n" only: JSON strings may hold U+2028 and other characters str.splitlines splits at
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if len(lines) == max_lines:
            raise InvalidBatch(f"the batch has more than {max_lines} lines (PALIMPSEST_BATCH_MAX_LINES)", field=source,
                               details=[{"line": number, "field": None,
                                         "message": f"over the limit of {max_lines} lines"}])
        lines.append((number, line))
    return lines


def validate_line(number: int, line: str, tenant_id: str, seen: dict) -> tuple[str, dict]:
    """(custom_id, Job columns) of one line, or ``ApiError`` with ``field`` relative to the line."""
    try:
        item = json.loads(line)
    except ValueError as error:
        raise ValidationError(f"not valid JSON: {error}") from None
    except RecursionError:
        raise ValidationError("not valid JSON: nested too deeply") from None
    if not isinstance(item, dict):
        raise ValidationError("must be a JSON object {custom_id, model, layer, request, params}")
    for field in item:
        if field not in LINE_FIELDS:
            raise ValidationError(f"unknown field; a line holds {', '.join(LINE_FIELDS)}", field=field)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID or not custom_id.isprintable():
        raise ValidationError(f"is required: your name for this line, 1 to {MAX_CUSTOM_ID} printable characters",
                              field="custom_id")
    if custom_id in seen:
        raise ValidationError(f"{custom_id!r} is also the custom_id of line {seen[custom_id]}", field="custom_id")
    seen[custom_id] = number
    columns = validate_job({k: v for k, v in item.items() if k != "custom_id"}, tenant_id)
    return custom_id, columns


def validate_lines(lines: list[tuple[int, str]], tenant_id: str, source: str) -> list[tuple[str, dict]]:
    """Every line's (custom_id, Job columns), or ``InvalidBatch`` listing every bad line."""
    members, errors, seen = [], [], {}
    for number, line in lines:
        try:
            members.append(validate_line(number, line, tenant_id, seen))
        except ApiError as error:
            errors.append({"line": number, "field": error.field, "message": error.message})
    if errors:
        shown = "" if len(errors) <= MAX_DETAILS else f" (the first {MAX_DETAILS} are listed)"
        raise InvalidBatch(f"{len(errors)} of {len(lines)} lines are invalid{shown}; nothing was queued",
                           field=source, details=errors[:MAX_DETAILS])
    if not members:
        raise InvalidBatch("the batch has no lines", field=source, details=[])
    return members


def send_members(job_ids: list[str], priority: int) -> None:
    """``run_job`` for each member, over one broker connection (one per task would cost a
    connection setup each); ``ServiceUnavailable`` when the broker cannot take them."""
    celery = current_app.extensions["celery"]
    try:
        with celery.producer_or_acquire() as producer:
            for job_id in job_ids:
                celery.send_task(RUN_JOB, args=[job_id], priority=broker_priority(priority), producer=producer)
    except (OperationalError, OSError) as error:
        current_app.logger.error("could not send the members of a batch: %s", error)
        raise ServiceUnavailable("the job queue is unavailable; try again later") from error


# -- views ----------------------------------------------------------------------------------

@bp.post("/batches")
def submit_batch():
    tenant_id = current_tenant_id()
    options, data, source = read_submission()
    columns = batch_options(options)
    lines = split_lines(data, current_app.config["PALIMPSEST_BATCH_MAX_LINES"], source)
    members = validate_lines(lines, tenant_id, source)

    batch_id = new_id("bat")
    key = tenant_key(tenant_id, "batches", batch_id, "input.jsonl")
    current_app.extensions["palimpsest_store"].put(key, io.BytesIO(data), content_type="application/jsonl")
    session = get_session()
    session.add(Batch(id=batch_id, tenant_id=tenant_id, status="validating", total_count=len(members),
                      input_object_key=key, **columns))
    session.flush()
    # One microsecond apart, so that (created_at, id) keeps the file's order: results follow it.
    now, job_ids = utcnow(), []
    for i, (custom_id, job_columns) in enumerate(members):
        job_columns.update(priority=columns["priority"], webhook_url=None)  # the batch's webhook, not each member's
        job = lifecycle.create_job(session, tenant_id=tenant_id, batch_id=batch_id, custom_id=custom_id,
                                   created_at=now + timedelta(microseconds=i), **job_columns)
        job_ids.append(job.id)
    set_status(session, batch_id, "validating", "in_progress")
    try:
        session.commit()
    except IntegrityError:
        # a model or base job was deleted since the lines were validated: validating again
        # names the line (another API process may still have held the model as ready)
        session.rollback()
        current_app.extensions["palimpsest_store"].delete(key)
        for _, job_columns in members:
            forget_model(job_columns["model_id"])
        validate_lines(lines, tenant_id, source)
        raise
    try:
        send_members(job_ids, columns["priority"])
    except ServiceUnavailable:
        # Members not sent can never run: end the batch, so that nobody waits on it.
        fail_batch(current_app.extensions["palimpsest_db"].session_factory, batch_id, "queue_unavailable",
                   "the batch's jobs could not be queued", current_app.extensions["celery"])
        raise
    return batch_view(get_batch(batch_id)), 202, {"Location": f"/v1/batches/{batch_id}"}


@bp.get("/batches")
def list_batches():
    """Newest first; ``next_cursor`` is null on the last page."""
    args = request.args
    known_only(args, LIST_FILTERS)
    query = select(Batch).where(Batch.tenant_id == current_tenant_id())
    if (status := args.get("status")) is not None:
        if status not in BATCH_STATUSES:
            raise ValidationError(f"must be one of {', '.join(BATCH_STATUSES)}", field="status")
        query = query.where(Batch.status == status)
    if (model_id := args.get("model")) is not None:  # batches with a member on this model
        query = query.where(select(Job.id).where(Job.batch_id == Batch.id, Job.model_id == model_id).exists())
    batches, next_cursor = page(query, Batch, args)
    return {"batches": [batch_view(b) for b in batches], "next_cursor": next_cursor}


def merge_view(row: BatchMerge) -> dict:
    """One joint solve of a merged batch (workers/merge.py), its files as download links."""
    return {
        "id": row.id, "model": row.model_id, "model_sha256": row.model_sha256, "layer": row.layer,
        "status": row.status, "rules": row.rules, "rank": row.rank, "report": row.report,
        "artifacts": [{"name": name, "sha256": getattr(row, f"{name}_sha256"),
                       "url": url_for("batches.download_merge", batch_id=row.batch_id, merge_id=row.id, name=name,
                                      _external=True)}
                      for name in MERGE_OBJECTS if getattr(row, f"{name}_object_key")],
        "error": {"code": row.error_code, "message": row.error_message or ""} if row.error_code else None,
    }


def show(batch: Batch) -> dict:
    """The batch resource, with its merges (a merged batch's joint solves; else none)."""
    merges = get_session().scalars(select(BatchMerge).where(BatchMerge.batch_id == batch.id)
                                   .order_by(BatchMerge.created_at, BatchMerge.id))
    return {**batch_view(batch), "merges": [merge_view(row) for row in merges]}


@bp.get("/batches/<batch_id>")
def show_batch(batch_id):
    return show(get_batch(batch_id))


@bp.get("/batches/<batch_id>/merges/<merge_id>/<name>")
def download_merge(batch_id, merge_id, name):
    """A merge's delta, checkpoint or report: a redirect to a presigned URL (S3), or the file streamed."""
    batch = get_batch(batch_id)
    row = get_session().scalar(select(BatchMerge).where(BatchMerge.id == merge_id, BatchMerge.batch_id == batch.id))
    key = getattr(row, f"{name}_object_key", None) if row is not None and name in MERGE_OBJECTS else None
    if key is None:
        raise ArtifactNotFound(f"batch {batch.id} has no merge file {merge_id}/{name}; merge files are named "
                               f"{', '.join(MERGE_OBJECTS)}")
    store = current_app.extensions["palimpsest_store"]
    url = store.url(key, expires_in=current_app.config["PALIMPSEST_PRESIGN_SECONDS"])
    if url is not None:
        return redirect(url, 302)
    try:
        stream = store.open(key)
    except ObjectNotFound:
        current_app.logger.error("merge file %s of batch %s is missing from the store", key, batch.id)
        raise ArtifactNotFound(f"batch {batch.id}'s merge file {merge_id}/{name} is missing from the store") from None

    def chunks():
        with stream:
            while chunk := stream.read(CHUNK_SIZE):
                yield chunk

    return Response(chunks(), mimetype=MERGE_OBJECTS[name], headers={
        "ETag": f'"{getattr(row, f"{name}_sha256")}"',
        "Content-Disposition": f'attachment; filename="{key.rsplit("/", 1)[-1]}"',
    })


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id):
    """Queued members are cancelled at once and never run; running ones are asked to stop
    and stop at their next step. The batch is ``cancelling`` until every member has ended,
    then ``cancelled``. Cancelling again is harmless; a batch that has ended (or is
    finalizing: its members have all ended) answers 409."""
    session = get_session()
    batch = get_batch(batch_id)
    if batch.status == "in_progress":
        set_status(session, batch.id, "in_progress", "cancelling")
        session.commit()
        batch = get_batch(batch_id)
    if batch.status != "cancelling":
        raise BatchFinished(f"batch {batch_id} is {batch.status}; only an in_progress batch can be cancelled")
    open_ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch.id,
                                                         Job.status.in_(OPEN_JOB_STATUSES))))
    for start in range(0, len(open_ids), CANCEL_CHUNK):
        for job_id in open_ids[start:start + CANCEL_CHUNK]:
            try:
                lifecycle.request_cancel(session, job_id)
            except lifecycle.IllegalTransition:
                pass  # it ended meanwhile
        session.commit()
    refresh_batch(current_app.extensions["palimpsest_db"].session_factory, batch.id, current_app.extensions["celery"])
    return show(get_batch(batch_id))


@bp.delete("/batches/<batch_id>")
def delete_batch(batch_id):
    """An ended batch with its members, their artifacts and its merges (their objects go
    after the deletion grace period); 409 while it runs or while a job outside it starts
    from one of its members."""
    batch = get_batch(batch_id)
    with committed(f"batch {batch.id}", BatchNotFinished) as session:
        deletion.delete_batch(session, batch)
    return "", 204


def result_line(job: Job, artifacts: list[Artifact]) -> dict:
    return {
        "custom_id": job.custom_id,
        "job": job.id,
        "status": job.status,
        "metrics": job.metrics,
        "artifacts": artifacts_json(artifacts, artifact_url),
        "error": {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
    }


@bp.get("/batches/<batch_id>/results")
def batch_results(batch_id):
    """One JSON line per member, in the order of the submitted file, as things stand now
    (members still queued or running have no metrics yet). Streamed a page at a time."""
    batch = get_batch(batch_id)
    tenant_id = current_tenant_id()

    def lines():
        session, after = get_session(), None
        while True:
            query = select(Job).where(Job.batch_id == batch.id, Job.tenant_id == tenant_id)
            if after is not None:
                query = query.where(or_(Job.created_at > after[0], and_(Job.created_at == after[0], Job.id > after[1])))
            jobs = list(session.scalars(query.order_by(Job.created_at, Job.id).limit(RESULTS_PAGE)))
            if not jobs:
                return
            artifacts = {job.id: [] for job in jobs}
            for artifact in session.scalars(select(Artifact).where(Artifact.job_id.in_(list(artifacts)))):
                artifacts[artifact.job_id].append(artifact)
            yield "".join(json.dumps(result_line(job, artifacts[job.id])) + "\n" for job in jobs)
            after = (jobs[-1].created_at, jobs[-1].id)

    return Response(stream_with_context(lines()), mimetype="application/jsonl",
                    headers={"Content-Disposition": f'attachment; filename="{batch.id}-results.jsonl"'})


# -- OpenAPI ----------------------------------------------------------------------------------

_BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
_BATCH = {"application/json": {"schema": {"$ref": "#/components/schemas/Batch"}}}
_JSONL = {"type": "string", "description": "One JSON object (BatchLine) per line, UTF-8, newline-separated"}
_OPTION_PARAMETERS = [
    {"name": "merge", "in": "query", "schema": {"type": "boolean", "default": False},
     "description": "Solve all edits on one model and layer jointly into one model"},
    {"name": "webhook", "in": "query", "schema": {"type": "string", "format": "uri", "maxLength": MAX_WEBHOOK_URL},
     "description": "http(s) URL on an allowed host (PALIMPSEST_WEBHOOK_ALLOWED_HOSTS), told of the batch's end"},
    {"name": "priority", "in": "query",
     "schema": {"type": "integer", "minimum": 0, "maximum": MAX_PRIORITY, "default": DEFAULT_BATCH_PRIORITY},
     "description": f"The members' priority; higher runs sooner (single jobs: {DEFAULT_PRIORITY})"},
]

OPENAPI_SCHEMAS = {
    "BatchLine": {
        "type": "object",
        "description": "One line of a batch: a job submission (JobSubmission) named by custom_id",
        "properties": {
            "custom_id": {"type": "string", "minLength": 1, "maxLength": MAX_CUSTOM_ID,
                          "description": "Your name for the line, unique in the batch; results carry it"},
            "model": {"type": "string"},
            "layer": {"type": "string"},
            "request": {"type": "object"},
            "params": {"type": "object"},
        },
        "required": ["custom_id", "model", "request"],
        "additionalProperties": False,
    },
    "Batch": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": list(BATCH_STATUSES)},
            "request_counts": {
                "type": "object",
                "properties": {name: {"type": "integer", "minimum": 0}
                               for name in ("total", "succeeded", "failed", "cancelled")},
                "required": ["total", "succeeded", "failed", "cancelled"],
            },
            "merge": {"type": "boolean"},
            "priority": {"type": "integer"},
            "webhook": {"type": ["string", "null"]},
            "error": {"oneOf": [{"type": "object", "properties": {"code": {"type": "string"},
                                                                  "message": {"type": "string"}},
                                 "required": ["code", "message"]}, {"type": "null"}],
                      "description": "Why a failed batch could not be processed"},
            "created_at": {"type": "string", "format": "date-time"},
            "finished_at": {"oneOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
            "expires_at": {"oneOf": [{"type": "string", "format": "date-time"}, {"type": "null"}],
                           "description": "When retention (PALIMPSEST_RETENTION_SECONDS) deletes the ended batch "
                                          "and its members, at the earliest; null: not ended or no retention"},
            "merges": {"type": "array", "items": {"$ref": "#/components/schemas/BatchMerge"},
                       "description": "Only in GET /v1/batches/{id} and cancel's answer"},
        },
        "required": ["id", "status", "request_counts", "merge", "priority", "webhook", "error", "created_at",
                     "finished_at", "expires_at"],
    },
    "BatchMerge": {
        "type": "object",
        "description": "One joint solve of a merged batch's succeeded edits on one checkpoint and layer",
        "properties": {
            "id": {"type": "string"},
            "model": {"type": ["string", "null"]},
            "model_sha256": {"type": "string"},
            "layer": {"type": "string"},
            "status": {"enum": list(BATCH_MERGE_STATUSES)},
            "rules": {"type": "integer", "description": "Edits merged"},
            "rank": {"type": ["integer", "null"]},
            "report": {"type": ["object", "null"],
                       "description": "Each rule's constraint loss unedited, alone and in the merged model; "
                                      "statistic: the key statistic whose metric a closed-form merge used"},
            "artifacts": {"type": "array", "items": {
                "type": "object",
                "properties": {"name": {"enum": list(MERGE_OBJECTS)}, "sha256": {"type": ["string", "null"]},
                               "url": {"type": "string"}},
                "required": ["name", "sha256", "url"]}},
            "error": {"oneOf": [{"type": "object", "properties": {"code": {"type": "string"},
                                                                  "message": {"type": "string"}},
                                 "required": ["code", "message"]}, {"type": "null"}]},
        },
        "required": ["id", "model", "model_sha256", "layer", "status", "rules", "rank", "report", "artifacts",
                     "error"],
    },
    "BatchList": {
        "type": "object",
        "properties": {
            "batches": {"type": "array", "items": {"$ref": "#/components/schemas/Batch"}},
            "next_cursor": {"type": ["string", "null"]},
        },
        "required": ["batches", "next_cursor"],
    },
    "BatchResult": {
        "type": "object",
        "description": "One line of GET /v1/batches/{id}/results",
        "properties": {
            "custom_id": {"type": "string"},
            "job": {"type": "string"},
            "status": {"enum": list(JOB_STATUSES)},
            "metrics": {"type": ["object", "null"]},
            "artifacts": {"type": "array", "items": {"$ref": "#/components/schemas/Artifact"}},
            "error": {"oneOf": [{"type": "object", "properties": {"code": {"type": "string"},
                                                                  "message": {"type": "string"}},
                                 "required": ["code", "message"]}, {"type": "null"}]},
        },
        "required": ["custom_id", "job", "status", "metrics", "artifacts", "error"],
    },
}

OPENAPI_PATHS = {
    "/v1/batches": {
        "post": {
            "operationId": "submitBatch",
            "tags": ["batches"],
            "summary": "Submit edits as JSONL (one BatchLine per line). Every line is validated first: the batch is "
                       "accepted whole (202), or refused (422 invalid_batch, error.details lists each bad line, "
                       "field and reason). Over PALIMPSEST_BATCH_MAX_BYTES: 413; over PALIMPSEST_BATCH_MAX_LINES: 422.",
            "security": SECURED,
            "parameters": _OPTION_PARAMETERS,
            "requestBody": {"required": True, "content": {
                "application/jsonl": {"schema": _JSONL},
                "application/x-ndjson": {"schema": _JSONL},
                "multipart/form-data": {"schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The JSONL file"},
                        "merge": {"type": "string", "enum": ["true", "false"]},
                        "webhook": {"type": "string"},
                        "priority": {"type": "string", "pattern": "^[0-9]$"},
                    },
                    "required": ["file"],
                }},
            }},
            "responses": {
                "202": {"description": "Accepted: in_progress, every member queued",
                        "headers": {"Location": {"schema": {"type": "string"}, "description": "/v1/batches/{id}"}},
                        "content": _BATCH},
                **error_responses(400, 401, 413, 415, 422),
            },
        },
        "get": {
            "operationId": "listBatches",
            "tags": ["batches"],
            "summary": "The tenant's batches, newest first, a page at a time",
            "security": SECURED,
            "parameters": [
                {"name": "status", "in": "query", "schema": {"enum": list(BATCH_STATUSES)}},
                {"name": "model", "in": "query", "schema": {"type": "string"},
                 "description": "Only batches with a member on this model"},
                *pagination.OPENAPI_PARAMETERS,
            ],
            "responses": {
                "200": {"description": "A page",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchList"}}}},
                **error_responses(401, 422),
            },
        },
    },
    "/v1/batches/{batch_id}": {
        "get": {
            "operationId": "getBatch",
            "tags": ["batches"],
            "summary": "Status, request_counts {total, succeeded, failed, cancelled}, and a merged batch's merges",
            "security": SECURED,
            "parameters": [_BATCH_ID],
            "responses": {"200": {"description": "The batch", "content": _BATCH}, **error_responses(401, 404)},
        },
        "delete": {
            "operationId": "deleteBatch",
            "tags": ["batches"],
            "summary": "Delete an ended batch with its member jobs, their artifacts and its merges (objects leave "
                       "the store after PALIMPSEST_DELETION_GRACE_SECONDS). 409 batch_not_finished while it runs, "
                       "409 in_use while a job outside it starts from one of its members",
            "security": SECURED,
            "parameters": [_BATCH_ID],
            "responses": {"204": {"description": "Deleted"}, **error_responses(401, 404, 409)},
        },
    },
    "/v1/batches/{batch_id}/merges/{merge_id}/{name}": {
        "get": {
            "operationId": "downloadBatchMerge",
            "tags": ["batches"],
            "summary": "A merge's file (delta, checkpoint or report): a redirect to a presigned URL (S3), or the "
                       "file streamed (file store)",
            "security": SECURED,
            "parameters": [_BATCH_ID,
                           {"name": "merge_id", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": ", ".join(MERGE_OBJECTS)}],
            "responses": {
                "200": {"description": "The file", "headers": {"ETag": {"schema": {"type": "string"},
                                                                        "description": "The quoted sha256"}},
                        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                                    "application/json": {"schema": {}}}},
                "302": {"description": "Presigned object store URL",
                        "headers": {"Location": {"schema": {"type": "string"}}}},
                **error_responses(401, 404),
            },
        }
    },
    "/v1/batches/{batch_id}/cancel": {
        "post": {
            "operationId": "cancelBatch",
            "tags": ["batches"],
            "summary": "Cancel: queued members never run, running ones stop at their next step; the batch is "
                       "cancelling until all have ended, then cancelled. A batch that has ended or is finalizing "
                       "answers 409 batch_finished.",
            "security": SECURED,
            "parameters": [_BATCH_ID],
            "responses": {"200": {"description": "The batch after the request", "content": _BATCH},
                          **error_responses(401, 404, 409)},
        }
    },
    "/v1/batches/{batch_id}/results": {
        "get": {
            "operationId": "getBatchResults",
            "tags": ["batches"],
            "summary": "JSONL, one BatchResult per line, in the submitted order: job id, status, metrics and "
                       "artifact links, or the error",
            "security": SECURED,
            "parameters": [_BATCH_ID],
            "responses": {
                "200": {"description": "One BatchResult per line", "content": {"application/jsonl": {"schema": {
                    "type": "string", "description": "Newline-separated BatchResult objects"}}}},
                **error_responses(401, 404),
            },
        }
    },
}
