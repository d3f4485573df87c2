"""The OpenAPI 3.1 document (``/v1/openapi.json``) and a reference page (``/docs``).

Each blueprint module describes its own routes next to its views, in
``OPENAPI_PATHS`` (and the schemas they use in ``OPENAPI_SCHEMAS``); this module
joins those of the blueprints registered on the app. A test checks that every
``/v1`` rule of the URL map appears in the document, so it cannot drift.
"""
import importlib

from flask import Blueprint, current_app

from api.auth import OPENAPI_SECURITY_SCHEMES
from api.errors import HTTP_CODES

bp = Blueprint("openapi", __name__)

ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "Stable, machine-readable; e.g. not_found, validation_error"},
                "message": {"type": "string", "description": "For people; may change"},
                "field": {"type": "string", "description": "The input field to blame, when there is one"},
                "details": {
                    "type": "array",
                    "description": "invalid_batch: each bad line's number, field (null: the line as a whole) and reason",
                    "items": {
                        "type": "object",
                        "properties": {"line": {"type": "integer"}, "field": {"type": ["string", "null"]},
                                       "message": {"type": "string"}},
                        "required": ["line", "field", "message"],
                    },
                },
            },
            "required": ["code", "message"],
        }
    },
    "required": ["error"],
    "examples": [{"error": {"code": "not_found", "message": "The requested URL was not found on the server."}}],
}


# For the blueprints' OPENAPI_PATHS: routes that need an API key, and their error answers.
SECURED = [{"bearer": []}]


def error_responses(*statuses: int) -> dict:
    return {str(status): {"$ref": "#/components/responses/Error"} for status in statuses}


UNAVAILABLE = {
    "description": "A dependency (the database, the broker or the object store) cannot be reached; "
                   "nothing was changed. Try again after `Retry-After` seconds.",
    "headers": {"Retry-After": {"description": "Seconds to wait before trying again",
                                "schema": {"type": "integer"}}},
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def with_unavailable(paths: dict) -> dict:
    """Every operation that needs an API key reads the database (the key itself), so any of
    them can answer 503 while it is down: documented here once, not route by route."""
    for operations in paths.values():
        for operation in operations.values():
            if operation.get("security") == SECURED:
                operation["responses"].setdefault("503", {"$ref": "#/components/responses/Unavailable"})
    return paths


def document(app) -> dict:
    paths, schemas = {}, {"Error": ERROR_SCHEMA}
    for blueprint in app.blueprints.values():
        module = importlib.import_module(blueprint.import_name)
        paths.update(getattr(module, "OPENAPI_PATHS", {}))
        schemas.update(getattr(module, "OPENAPI_SCHEMAS", {}))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Palimpsest",
            "version": "1",
            "description": "Rewrite deep generative models as jobs (Bau et al., ECCV 2020). "
                           "Every error answers with an `Error` body; its `code` is stable. "
                           f"Codes from the HTTP layer: {', '.join(sorted(set(HTTP_CODES.values())))}.",
        },
        "paths": with_unavailable(dict(sorted(paths.items()))),
        "components": {
            "securitySchemes": OPENAPI_SECURITY_SCHEMES,
            "schemas": schemas,
            "responses": {
                "Error": {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "Unavailable": UNAVAILABLE,
            },
        },
    }


@bp.get("/v1/openapi.json")
def openapi_json():
    return document(current_app)


# Swagger UI from a CDN. Offline the page still loads and links the raw document.
DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Palimpsest API</title>
  <link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head>
<body>
  <p id="fallback">Palimpsest API reference. The OpenAPI document is at
    <a href="/v1/openapi.json">/v1/openapi.json</a>; this page renders it when it can reach cdn.jsdelivr.net.</p>
  <div id="swagger-ui"></div>
  <script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js" crossorigin></script>
  <script>
    if (window.SwaggerUIBundle) {
      document.getElementById("fallback").hidden = true;
      SwaggerUIBundle({url: "/v1/openapi.json", dom_id: "#swagger-ui"});
    }
  </script>
</body>
</html>
"""


@bp.get("/docs")
def docs():
    return DOCS_HTML, 200, {"Content-Type": "text/html; charset=utf-8"}


OPENAPI_PATHS = {
    "/v1/openapi.json": {
        "get": {
            "operationId": "openapi",
            "tags": ["meta"],
            "summary": "This document (OpenAPI 3.1)",
            "responses": {"200": {"description": "The document", "content": {"application/json": {"schema": {"type": "object"}}}}},
        }
    },
    "/docs": {
        "get": {
            "operationId": "docs",
            "tags": ["meta"],
            "summary": "Human-readable reference (Swagger UI, loaded from a CDN)",
            "responses": {"200": {"description": "HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}},
        }
    },
}
