"""Liveness and readiness.

``/v1/healthz`` answers 200 while the process serves requests (no dependencies).
``/v1/readyz`` checks each dependency the API needs, and answers 503 naming the
ones that failed, so a load balancer stops sending traffic to an instance that
cannot do its work.
"""
from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from storage.db import get_session

bp = Blueprint("health", __name__, url_prefix="/v1")

BROKER_TIMEOUT_S = 3.0  # total over retries; a broker slower than this to connect is not ready


def check_database():
    get_session().execute(text("SELECT 1"))


def check_broker():
    celery = current_app.extensions["celery"]
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_S)
        # A round trip on a channel: for the embedded SQL broker, connecting alone touches nothing.
        connection.default_channel.queue_declare(queue="cpu", durable=True, auto_delete=False)


def check_store():
    current_app.extensions["palimpsest_store"].check()


CHECKS = {"database": check_database, "broker": check_broker, "store": check_store}


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    checks = {}
    for name, check in CHECKS.items():
        try:
            check()
        except Exception as error:  # any failure means not ready; report it, do not raise
            current_app.logger.warning("readiness check %s failed: %s", name, error)
            checks[name] = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:300]}
        else:
            checks[name] = {"status": "ok"}
    failed = [name for name, result in checks.items() if result["status"] != "ok"]
    body = {"status": "unavailable" if failed else "ready", "failed": failed, "checks": checks}
    return jsonify(body), 503 if failed else 200


OPENAPI_PATHS = {
    "/v1/healthz": {
        "get": {
            "operationId": "healthz",
            "tags": ["health"],
            "summary": "Liveness: 200 while the process serves requests",
            "responses": {
                "200": {
                    "description": "Alive",
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "properties": {"status": {"const": "ok"}},
                        "required": ["status"],
                    }}},
                }
            },
        }
    },
    "/v1/readyz": {
        "get": {
            "operationId": "readyz",
            "tags": ["health"],
            "summary": "Readiness: database (SELECT 1), broker (connect + queue round trip) and object store",
            "responses": {
                "200": {"description": "Every check passed",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}},
                "503": {"description": "At least one check failed; `failed` names them",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}},
            },
        }
    },
}

OPENAPI_SCHEMAS = {
    "Readiness": {
        "type": "object",
        "properties": {
            "status": {"enum": ["ready", "unavailable"]},
            "failed": {"type": "array", "items": {"enum": list(CHECKS)}},
            "checks": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {"status": {"enum": ["ok", "failed"]}, "error": {"type": "string"}},
                    "required": ["status"],
                },
            },
        },
        "required": ["status", "failed", "checks"],
    }
}
