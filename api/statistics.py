"""Layer statistics (second moments of a layer's keys): list them, precompute one.

A statistic depends only on the checkpoint's bytes, the layer and the images it was
computed over, so rows are keyed by ``(model_sha256, layer, sample_spec)`` and shared
by every tenant (the layer is the module holding the weight, whose input the keys are:
a statistic asked for ``layer6`` is the row of ``layer6.conv``, ``storage.statistics.keys_layer``) with a model of those bytes; a tenant sees the statistics of the
models it can use, and no others. ``POST`` inserts the row if it is absent
(``storage.statistics``, shared with the workers: concurrent requests meet on one
row) and sends ``workers.statistics.compute_statistic(statistic_id)`` when the row is
new, or when its last computation failed.
"""
from flask import Blueprint, current_app, request
from sqlalchemy import select, update

from api.auth import current_tenant_id
from api.errors import ApiError, ModelNotReady, StatisticNotFound, UnknownLayer, ValidationError
from api.inputs import json_body, known_only
from api.models import visible_to
from api.openapi import SECURED, error_responses
from api.tasks import COMPUTE_STATISTIC, DEFAULT_PRIORITY, send_task
from rewriting.errors import UnknownLayer as EngineUnknownLayer
from rewriting.requests import check_layer
from storage.db import get_session
from storage.models import STATISTIC_STATUSES, Model, Statistic
from storage.statistics import MAX_STAT_SAMPLES, insert_statistic, keys_layer, parse_sample_spec, sample_spec

bp = Blueprint("statistics", __name__, url_prefix="/v1")

STATISTIC_FIELDS = ("model", "layer", "samples")
LIST_FILTERS = ("model", "layer", "status")


def visible_models(tenant_id: str, model_id: str | None = None) -> dict[str, str]:
    """sha256 -> the id of a model with those bytes the tenant can use (the oldest one,
    or ``model_id`` when given)."""
    query = select(Model.id, Model.sha256).where(visible_to(tenant_id))
    if model_id is not None:
        query = query.where(Model.id == model_id)
    by_sha = {}
    for model_id_, sha256 in get_session().execute(query.order_by(Model.created_at.desc(), Model.id.desc())):
        by_sha[sha256] = model_id_  # oldest last, so it wins
    return by_sha


def statistic_json(stat: Statistic, model_id: str) -> dict:
    return {
        "id": stat.id,
        "model": model_id,
        "model_sha256": stat.model_sha256,
        "layer": stat.layer,
        "sample_spec": stat.sample_spec,
        "samples": len(parse_sample_spec(stat.sample_spec)),
        "status": stat.status,
        "count": stat.count,
        "size": stat.size,
        "sha256": stat.sha256,
        "error": stat.error,
        "created_at": stat.created_at.isoformat(),
        "updated_at": stat.updated_at.isoformat(),
    }


@bp.get("/statistics")
def list_statistics():
    args = request.args
    known_only(args, LIST_FILTERS)
    models = visible_models(current_tenant_id(), args.get("model"))
    query = select(Statistic).where(Statistic.model_sha256.in_(list(models)))
    if (layer := args.get("layer")) is not None:
        # a block's statistic is the row of its weight module (keys_layer): either name finds it
        layer_lists = get_session().scalars(select(Model.layers).where(Model.sha256.in_(list(models))))
        query = query.where(Statistic.layer.in_({layer} | {keys_layer(ls or [], layer) for ls in layer_lists}))
    if (status := args.get("status")) is not None:
        if status not in STATISTIC_STATUSES:
            raise ValidationError(f"must be one of {', '.join(STATISTIC_STATUSES)}", field="status")
        query = query.where(Statistic.status == status)
    stats = get_session().scalars(query.order_by(Statistic.created_at.desc(), Statistic.id.desc()))
    return {"statistics": [statistic_json(s, models[s.model_sha256]) for s in stats]}


@bp.get("/statistics/<statistic_id>")
def show_statistic(statistic_id):
    stat = get_session().get(Statistic, statistic_id)
    models = visible_models(current_tenant_id())
    if stat is None or stat.model_sha256 not in models:
        raise StatisticNotFound(f"no statistic {statistic_id!r}")
    return statistic_json(stat, models[stat.model_sha256])


@bp.post("/statistics")
def precompute_statistic():
    """202 when a computation was queued (new row, or a failed one retried), 200 when the
    statistic is ready, or pending or computing already."""
    body = json_body()
    known_only(body, STATISTIC_FIELDS, "field")
    session = get_session()
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise ValidationError("is required: the id of a model", field="model")
    model = session.scalar(select(Model).where(Model.id == model_id, visible_to(current_tenant_id())))
    if model is None:
        raise ValidationError(f"no model {model_id!r}", field="model")
    if model.status != "ready":
        raise ModelNotReady(f"model {model.id} is {model.status}", field="model")
    layer = body.get("layer")
    try:
        check_layer(layer, [info["name"] for info in model.layers])
    except EngineUnknownLayer as error:
        raise UnknownLayer(str(error), field="layer") from None
    layer = keys_layer(model.layers, layer)
    samples = body.get("samples", current_app.config["PALIMPSEST_STAT_SAMPLES"])
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_STAT_SAMPLES:
        raise ValidationError(f"must be an integer in [1, {MAX_STAT_SAMPLES}] (images)", field="samples")
    spec = sample_spec(samples)
    stat = session.scalar(select(Statistic).where(
        Statistic.model_sha256 == model.sha256, Statistic.layer == layer, Statistic.sample_spec == spec))
    if stat is None:
        # Two requests racing here both send the task; that is harmless: it computes only
        # while it holds the row's lease, and returns at once when the statistic is ready.
        stat = insert_statistic(session, model.sha256, layer, spec)
        session.commit()
        queue = True
    else:
        queue = stat.status == "failed"  # try again; pending or computing ones are under way
        if queue:  # asked for anew: its task gets a fresh count of deliveries (workers.deliveries)
            session.execute(update(Statistic).where(Statistic.id == stat.id).values(deliveries=0))
            session.commit()
    if queue:
        try:
            send_task(COMPUTE_STATISTIC, stat.id, priority=DEFAULT_PRIORITY)
        except ApiError:
            # Nothing is queued: a pending row would read "under way" to the retry the 503
            # invites. Failed, the retry queues it again.
            session.execute(update(Statistic).where(Statistic.id == stat.id, Statistic.status == "pending",
                                                    Statistic.lease_owner.is_(None))
                            .values(status="failed", error="queue_unavailable: the statistic could not be queued"))
            session.commit()
            raise
    return statistic_json(stat, model.id), 202 if queue else 200, {"Location": f"/v1/statistics/{stat.id}"}


_STATISTIC = {"application/json": {"schema": {"$ref": "#/components/schemas/Statistic"}}}

OPENAPI_SCHEMAS = {
    "Statistic": {
        "type": "object",
        "description": "The second moment of one layer's keys over some images, shared by every model with the "
                       "same bytes (sha256)",
        "properties": {
            "id": {"type": "string"},
            "model": {"type": "string", "description": "A model of yours (or shared) with these bytes"},
            "model_sha256": {"type": "string"},
            "layer": {"type": "string", "description": "The module whose input the keys are: the weight module "
                                                      "(layer6.conv for a request naming layer6)"},
            "sample_spec": {"type": "string", "description": "seeds:<start>-<stop>, stop excluded"},
            "samples": {"type": "integer", "description": "Images (seeds) in the spec"},
            "status": {"enum": list(STATISTIC_STATUSES)},
            "count": {"type": ["integer", "null"], "description": "Key vectors summed (ready)"},
            "size": {"type": ["integer", "null"], "description": "Bytes of the stored statistic (ready)"},
            "sha256": {"type": ["string", "null"]},
            "error": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
        },
        "required": ["id", "model", "model_sha256", "layer", "sample_spec", "samples", "status", "count", "size",
                     "sha256", "error", "created_at", "updated_at"],
    },
    "StatisticList": {
        "type": "object",
        "properties": {"statistics": {"type": "array", "items": {"$ref": "#/components/schemas/Statistic"}}},
        "required": ["statistics"],
    },
    "StatisticRequest": {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "layer": {"type": "string"},
            "samples": {"type": "integer", "minimum": 1, "maximum": MAX_STAT_SAMPLES,
                        "description": "Images; default PALIMPSEST_STAT_SAMPLES (what jobs use by default)"},
        },
        "required": ["model", "layer"],
        "additionalProperties": False,
    },
}

OPENAPI_PATHS = {
    "/v1/statistics": {
        "get": {
            "operationId": "listStatistics",
            "tags": ["statistics"],
            "summary": "Cached statistics of the models the tenant can use, newest first",
            "security": SECURED,
            "parameters": [
                {"name": "model", "in": "query", "schema": {"type": "string"}},
                {"name": "layer", "in": "query", "schema": {"type": "string"},
                 "description": "A layer the statistic serves: a block or the weight module holding its keys"},
                {"name": "status", "in": "query", "schema": {"enum": list(STATISTIC_STATUSES)}},
            ],
            "responses": {
                "200": {"description": "Statistics", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/StatisticList"}}}},
                **error_responses(401, 422),
            },
        },
        "post": {
            "operationId": "precomputeStatistic",
            "tags": ["statistics"],
            "summary": "Precompute a statistic (computed once, whoever asks)",
            "security": SECURED,
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/StatisticRequest"}}}},
            "responses": {
                "202": {"description": "Computation queued (new, or an earlier one failed)",
                        "headers": {"Location": {"schema": {"type": "string"}}}, "content": _STATISTIC},
                "200": {"description": "Already ready, or being computed",
                        "headers": {"Location": {"schema": {"type": "string"}}}, "content": _STATISTIC},
                **error_responses(400, 401, 409, 413, 422),
            },
        },
    },
    "/v1/statistics/{statistic_id}": {
        "get": {
            "operationId": "getStatistic",
            "tags": ["statistics"],
            "summary": "One statistic",
            "security": SECURED,
            "parameters": [{"name": "statistic_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The statistic", "content": _STATISTIC}, **error_responses(401, 404)},
        }
    },
}
