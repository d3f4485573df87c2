"""Models: upload a safetensors checkpoint, register one already in the store, list them.

An upload streams from the socket to the object store (``api.multipart``), never
held whole in memory, and is refused up front unless it starts like a safetensors
file: an 8-byte little-endian header length, then a JSON header describing every
tensor. Nothing here ever unpickles. A new model is ``pending`` until the worker task
``workers.models.inspect_model`` has loaded it and filled its editable layers.

Every tenant sees its own models and the shared ones (``tenant_id`` NULL: the demo).
"""
import json
import math
import re
import struct
from dataclasses import dataclass

from flask import Blueprint, current_app, request
from sqlalchemy import or_, select, update
from werkzeug.http import parse_options_header

from api.auth import current_tenant_id
from api.deletion import committed
from api.errors import (ApiError, BadRequest, Forbidden, InUse, InvalidCheckpoint, ModelNotFound, ModelNotReady,
                        PayloadTooLarge, ValidationError)
from api.inputs import json_body, json_problem, known_only
from api.multipart import MultipartReader
from api.openapi import SECURED, error_responses
from api.tasks import INSPECT_MODEL, send_task
from storage import deletion
from storage.db import get_session
from storage.models import Model, new_id
from storage.objects import InvalidKey, ObjectNotFound, copy_hashed, tenant_key, validate_key
from workers.cache import LRU

bp = Blueprint("models", __name__, url_prefix="/v1")

MAX_HEADER_BYTES = 16 * 1024 * 1024  # real headers are kilobytes; safetensors itself stops at 100 MB
MAX_FIELD_BYTES = 64 * 1024
ARCHITECTURE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
UPLOAD_FIELDS = ("name", "architecture", "config", "file")
REGISTER_FIELDS = ("object_key", "name", "architecture", "config")
# Bytes per element of the safetensors dtypes whose size is a whole number of bytes.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


def visible_to(tenant_id: str):
    """The models a tenant may use: its own and the shared ones."""
    return or_(Model.tenant_id == tenant_id, Model.tenant_id.is_(None))


def get_model(model_id: str) -> Model:
    """The current tenant's (or a shared) model, else ``ModelNotFound``, also for another
    tenant's model, so that ids cannot be probed."""
    model = get_session().scalar(select(Model).where(Model.id == model_id, visible_to(current_tenant_id())))
    if model is None:
        raise ModelNotFound(f"no model {model_id!r}")
    return model


@dataclass(frozen=True)
class ReadyModel:
    """What a job submission needs of a ready model: its owner (None: shared) and layers."""
    id: str
    tenant_id: str | None
    layers: tuple


READY_MODELS_KEPT = 1024  # per API process, the most recently used


def ready_models() -> LRU:
    """The API process's cache of ready models (``app.extensions``), for ``ready_model``.

    A ready row's owner and layers are written once, and a model not ready yet is never
    kept, so a submission needs no model query (about a tenth of its CPU). A model deleted
    through another API process stays here until a submission's insert fails on it: the
    foreign key refuses the job, and the submission forgets the model (``forget_model``)
    and validates again, which answers 422.
    """
    return LRU(READY_MODELS_KEPT, "ready model")


def ready_model(model_id: str, tenant_id: str) -> ReadyModel:
    """The model ``tenant_id`` may run a job on; 422 naming ``model`` for a missing one or
    another tenant's (they read alike), 409 for one that is not ready."""
    def load() -> ReadyModel:  # raises for a model not to be kept
        row = get_session().scalar(select(Model).where(Model.id == model_id, visible_to(tenant_id)))
        if row is None:
            raise ValidationError(f"no model {model_id!r}", field="model")
        if row.status != "ready":
            detail = f": {row.error}" if row.error else " (it is still being inspected)"
            raise ModelNotReady(f"model {row.id} is {row.status}{detail}", field="model")
        return ReadyModel(row.id, row.tenant_id, tuple(row.layers))

    model = current_app.extensions["palimpsest_ready_models"].get(model_id, load)
    if model.tenant_id not in (None, tenant_id):  # kept for its owner; another tenant's reads as missing
        raise ValidationError(f"no model {model_id!r}", field="model")
    return model


def forget_model(model_id: str) -> None:
    current_app.extensions["palimpsest_ready_models"].discard(model_id)


def model_json(model: Model) -> dict:
    return {
        "id": model.id,
        "name": model.name,
        "architecture": model.architecture,
        "config": model.config,
        "sha256": model.sha256,
        "size": model.size,
        "status": model.status,
        "error": model.error,
        "shared": model.tenant_id is None,
        "layers": model.layers or [],
        "created_at": model.created_at.isoformat(),
    }


# -- safetensors, without unpickling anything ---------------------------------------

def read_header(stream) -> tuple[bytes, dict]:
    """Read and check a safetensors header from the start of ``stream``.

    Returns the bytes read (length prefix + header, to be stored with the rest) and the
    parsed header. Raises ``InvalidCheckpoint`` (field ``file``) for anything else: a
    pickle, a zip (``torch.save``), a truncated or malformed header.
    """
    prefix = _read_exactly(stream, 8)
    if len(prefix) < 8:
        raise InvalidCheckpoint("not a safetensors file: shorter than its 8-byte header length", field="file")
    (length,) = struct.unpack("<Q", prefix)
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise InvalidCheckpoint(
            f"not a safetensors file: header length {length} is outside [2, {MAX_HEADER_BYTES}] "
            "(pickled checkpoints, e.g. from torch.save, are refused: save with safetensors)", field="file")
    raw = _read_exactly(stream, length)
    if len(raw) < length or not raw.startswith(b"{"):
        raise InvalidCheckpoint("not a safetensors file: the header is not a JSON object", field="file")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidCheckpoint("not a safetensors file: the header is not valid JSON", field="file") from None
    if not isinstance(header, dict):
        raise InvalidCheckpoint("not a safetensors file: the header is not a JSON object", field="file")
    data_size(header)  # checks every entry
    return prefix + raw, header


def _read_exactly(stream, n: int) -> bytes:
    parts, left = [], n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def data_size(header: dict) -> int:
    """Bytes of tensor data the header describes (the end of the last tensor)."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise InvalidCheckpoint("safetensors __metadata__ must map names to strings", field="file")
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
                and len(entry["data_offsets"]) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in entry["data_offsets"])):
            raise InvalidCheckpoint(f"safetensors entry {name!r} needs dtype, shape and data_offsets", field="file")
        begin, stop = entry["data_offsets"]
        itemsize = DTYPE_BYTES.get(entry["dtype"])
        if stop < begin or (itemsize is not None and stop - begin != math.prod(entry["shape"]) * itemsize):
            raise InvalidCheckpoint(f"safetensors entry {name!r}: data_offsets do not match its dtype and shape",
                                    field="file")
        end = max(end, stop)
    return end


class _Prepend:
    """``head`` then the rest of ``stream``, as one readable stream."""

    def __init__(self, head: bytes, stream):
        self._head = head
        self._stream = stream

    def read(self, n: int | None = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                data, self._head = self._head + self._stream.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._stream.read(n)


class _NullSink:
    def write(self, data):
        return len(data)


# -- metadata fields ---------------------------------------------------------------

def _description(fields: dict, header: dict) -> tuple[str, dict]:
    """Architecture and config: from the request's fields, else from the file's metadata
    (``rewriting.checkpoint.save_model`` writes both)."""
    metadata = header.get("__metadata__", {})
    architecture = fields.get("architecture") or metadata.get("architecture")
    if not architecture:
        raise ValidationError("is required (the checkpoint's metadata names none)", field="architecture")
    if not isinstance(architecture, str) or not ARCHITECTURE.match(architecture):
        raise ValidationError(f"must be a short name such as 'demo-gan', not {architecture!r}", field="architecture")
    config = fields.get("config")
    if config is None and "config" in metadata:
        config = metadata["config"]
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except (ValueError, RecursionError):
            raise ValidationError("must be a JSON object", field="config") from None
        if (problem := json_problem(config)) is not None:  # as api.inputs checks JSON bodies
            raise ValidationError(f"{problem[0] or 'the object'} {problem[1]}", field="config")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValidationError("must be a JSON object", field="config")
    return architecture, config


def _name(fields: dict, default: str) -> str:
    name = fields.get("name") or default
    if not isinstance(name, str) or len(name) > 200 or "\x00" in name:
        raise ValidationError("must be a string of at most 200 characters, without NUL",
                              field="name" if fields.get("name") else "file")  # the default is the file's name
    return name


def _check_size(stored_size: int, header_bytes: bytes, header: dict) -> None:
    expected = len(header_bytes) + data_size(header)
    if stored_size != expected:
        raise InvalidCheckpoint(
            f"the file is {stored_size} bytes but its header describes {expected}: truncated or padded", field="file")


# -- views -----------------------------------------------------------------------------

@bp.get("/models")
def list_models():
    models = get_session().scalars(
        select(Model).where(visible_to(current_tenant_id())).order_by(Model.created_at.desc(), Model.id.desc())
    )
    return {"models": [model_json(m) for m in models]}


@bp.get("/models/<model_id>")
def show_model(model_id):
    return model_json(get_model(model_id))


@bp.delete("/models/<model_id>")
def delete_model(model_id):
    """The tenant's model and, after the deletion grace period, its checkpoint; 409 while
    jobs or batch merges name it, 403 for a shared model."""
    model = get_model(model_id)
    if model.tenant_id is None:
        raise Forbidden(f"model {model.id} is shared by every tenant; an operator removes it")
    with committed(f"model {model.id}", InUse) as session:
        deletion.delete_model(session, model)
    forget_model(model.id)
    return "", 204


@bp.post("/models")
def create_model():
    mimetype, options = parse_options_header(request.headers.get("Content-Type", ""))
    if mimetype == "multipart/form-data":
        model = upload(options.get("boundary"))
    elif mimetype == "application/json":
        model = register()
    else:
        raise BadRequest("send multipart/form-data (upload a file) or application/json (register a stored object)")
    session = get_session()
    session.add(model)
    session.commit()  # the row exists before the worker is asked to look at it
    try:
        send_task(INSPECT_MODEL, model.id)
    except ApiError:
        # Nothing will inspect it: fail it rather than leave it pending; a retry uploads anew.
        session.execute(update(Model).where(Model.id == model.id, Model.status == "pending")
                        .values(status="failed", error="queue_unavailable: the model could not be queued for "
                                                       "inspection; upload it again"))
        session.commit()
        raise
    return model_json(model), 202, {"Location": f"/v1/models/{model.id}"}


def upload(boundary: str | None) -> Model:
    """Stream the ``file`` part to the store; read the small fields around it."""
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    limit = current_app.config["PALIMPSEST_MAX_UPLOAD_BYTES"]
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"upload of {request.content_length} bytes is over the limit of {limit} bytes")
    request.max_content_length = limit  # the app-wide limit is for JSON bodies
    tenant_id = current_tenant_id()
    store = current_app.extensions["palimpsest_store"]
    model_id = new_id("mdl")
    key = tenant_key(tenant_id, "models", model_id, "model.safetensors")
    fields, stored, filename = {}, None, None
    try:
        for part in MultipartReader(request.stream, boundary):
            if part.name not in UPLOAD_FIELDS:
                raise ValidationError(f"unknown form field; expected {', '.join(UPLOAD_FIELDS)}", field=part.name)
            if part.name in fields or (part.name == "file" and stored is not None):
                raise ValidationError("given twice", field=part.name)
            if part.name != "file":
                fields[part.name] = part.read_text(MAX_FIELD_BYTES)
                continue
            if part.filename is None:
                raise ValidationError("must be a file part (filename=...)", field="file")
            header_bytes, header = read_header(part)  # before anything reaches the store
            stored = store.put(key, _Prepend(header_bytes, part), content_type="application/octet-stream")
            _check_size(stored.size, header_bytes, header)
            filename = part.filename
        if stored is None:
            raise ValidationError("is required: the safetensors checkpoint", field="file")
        architecture, config = _description(fields, header)
        name = _name(fields, filename.rsplit("/", 1)[-1] or model_id)
    except BaseException:
        if stored is not None:
            store.delete(key)
        raise
    return Model(id=model_id, tenant_id=tenant_id, name=name, architecture=architecture, config=config,
                 sha256=stored.sha256, size=stored.size, object_key=key, layers=[], status="pending")


def register() -> Model:
    """A checkpoint already in the store, inside the tenant's own prefix."""
    body = json_body()
    known_only(body, REGISTER_FIELDS, "field")
    tenant_id = current_tenant_id()
    key = body.get("object_key")
    own_prefix = tenant_key(tenant_id, "_")[:-1]  # "tenants/<tenant_id>/"
    if isinstance(key, str) and "%" in key:  # no key the service writes has one; a store may decode it
        raise ValidationError("must be the key as stored, not URL-encoded ('%')", field="object_key")
    try:
        if not isinstance(key, str) or not validate_key(key).startswith(own_prefix):
            raise InvalidKey(key)
    except InvalidKey:
        raise ValidationError(f"must be a key inside this tenant's space, {own_prefix}...", field="object_key") from None
    store = current_app.extensions["palimpsest_store"]
    try:
        stream = store.open(key)
    except ObjectNotFound:
        raise ValidationError("no object at this key", field="object_key") from None
    with stream:
        header_bytes, header = read_header(stream)
        sha256, size = copy_hashed(_Prepend(header_bytes, stream), _NullSink())
    _check_size(size, header_bytes, header)
    for field in ("name", "architecture"):
        if field in body and not isinstance(body[field], str):
            raise ValidationError("must be a string", field=field)
    architecture, config = _description(body, header)
    name = _name(body, key.rsplit("/", 1)[-1])
    return Model(tenant_id=tenant_id, name=name, architecture=architecture, config=config,
                 sha256=sha256, size=size, object_key=key, layers=[], status="pending")


NULLABLE_SIZE = {"oneOf": [{"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
                           {"type": "null"}]}

OPENAPI_SCHEMAS = {
    "Layer": {
        "type": "object",
        "description": "An editable layer, from the worker's inspection (rewriting.layers.editable_layers). "
                       "Keys are the weight module's inputs, values the layer's outputs; sizes are [h, w], "
                       "or null for a linear layer.",
        "properties": {
            "name": {"type": "string"}, "kind": {"type": "string"}, "param": {"type": "string"},
            "key_channels": {"type": "integer"}, "key_size": NULLABLE_SIZE,
            "value_channels": {"type": "integer"}, "value_size": NULLABLE_SIZE,
        },
        "required": ["name", "key_channels", "key_size", "value_channels", "value_size"],
    },
    "Model": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "architecture": {"type": "string"},
            "config": {"type": "object"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "size": {"type": "integer", "description": "Bytes"},
            "status": {"enum": ["pending", "ready", "failed"],
                       "description": "pending until a worker has inspected the checkpoint; jobs need ready"},
            "error": {"type": ["string", "null"], "description": "Why the checkpoint was refused (status failed)"},
            "shared": {"type": "boolean", "description": "Visible to every tenant (the demo)"},
            "layers": {"type": "array", "items": {"$ref": "#/components/schemas/Layer"}},
            "created_at": {"type": "string", "format": "date-time"},
        },
        "required": ["id", "name", "architecture", "config", "sha256", "size", "status", "error", "shared",
                     "layers", "created_at"],
    },
    "ModelList": {
        "type": "object",
        "properties": {"models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}},
        "required": ["models"],
    },
    "ModelUpload": {
        "type": "object",
        "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "A safetensors checkpoint; anything else (a pickle, torch.save's zip) is refused "
                                    "by its first bytes, before it is stored"},
            "name": {"type": "string", "maxLength": 200, "description": "Default: the file's name"},
            "architecture": {"type": "string", "description": "Default: the file's metadata (save_model writes it)"},
            "config": {"type": "string", "description": "JSON object of constructor arguments; default: the file's "
                                                        "metadata"},
        },
        "required": ["file"],
    },
    "ModelRegistration": {
        "type": "object",
        "properties": {
            "object_key": {"type": "string", "description": "A safetensors object already in the store, under "
                                                            "tenants/<your tenant id>/"},
            "name": {"type": "string", "maxLength": 200},
            "architecture": {"type": "string"},
            "config": {"type": "object"},
        },
        "required": ["object_key"],
        "additionalProperties": False,
    },
}

_MODEL = {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}

OPENAPI_PATHS = {
    "/v1/models": {
        "get": {
            "operationId": "listModels",
            "tags": ["models"],
            "summary": "The tenant's models and the shared ones, newest first",
            "security": SECURED,
            "responses": {
                "200": {"description": "Models",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}}},
                **error_responses(401),
            },
        },
        "post": {
            "operationId": "createModel",
            "tags": ["models"],
            "summary": "Upload a safetensors checkpoint (multipart, streamed to the store), or register one already "
                       "in the store (JSON). The model is pending until a worker has inspected it.",
            "security": SECURED,
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": {"$ref": "#/components/schemas/ModelUpload"}},
                "application/json": {"schema": {"$ref": "#/components/schemas/ModelRegistration"}},
            }},
            "responses": {
                "202": {"description": "Stored; inspection queued",
                        "headers": {"Location": {"schema": {"type": "string"}}}, "content": _MODEL},
                **error_responses(400, 401, 413, 422),
            },
        },
    },
    "/v1/models/{model_id}": {
        "get": {
            "operationId": "getModel",
            "tags": ["models"],
            "summary": "One model: sha256, size, architecture, status and editable layers",
            "security": SECURED,
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The model", "content": _MODEL}, **error_responses(401, 404)},
        },
        "delete": {
            "operationId": "deleteModel",
            "tags": ["models"],
            "summary": "Delete one of the tenant's models; its checkpoint leaves the store after "
                       "PALIMPSEST_DELETION_GRACE_SECONDS. 409 in_use while jobs or batch merges name it (delete "
                       "them first), 403 for a shared model",
            "security": SECURED,
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"204": {"description": "Deleted"}, **error_responses(401, 403, 404, 409)},
        },
    },
}
