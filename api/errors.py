"""Every error the API answers with, and the one handler that renders them.

Views raise these instead of building error responses. Each class has an HTTP
status and a stable ``code`` that clients may branch on; the message is for people.
Every error body has the same shape::

    {"error": {"code": "validation_error", "message": "...", "field": "layer"}}

(``field`` only where one input field is to blame; ``details`` only where several
things are, e.g. a batch's bad lines: ``[{"line", "field", "message"}, ...]``). Werkzeug's own HTTP errors
(unknown route, wrong method, body too large) are rendered the same way.
"""
import logging

from flask import jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    status = 500
    code = "internal_error"
    headers: dict = {}

    def __init__(self, message: str, field: str | None = None, details: list | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details


class ValidationError(ApiError):
    """A field of the request is wrong (``field`` names it); the body itself parsed."""

    status = 422
    code = "validation_error"


class InvalidEditRequest(ValidationError):
    code = "invalid_request"  # rewriting.errors.EditRequestError.code


class UnknownLayer(ValidationError):
    code = "unknown_layer"  # rewriting.errors.UnknownLayer.code


class InvalidCheckpoint(ValidationError):
    code = "invalid_checkpoint"  # rewriting.errors.CheckpointError.code


class IdempotencyMismatch(ValidationError):
    code = "idempotency_mismatch"


class InvalidBatch(ValidationError):
    """Lines of a batch are wrong: ``details`` lists each one's number, field and reason."""

    code = "invalid_batch"


class BadRequest(ApiError):
    """The body cannot be read at all (malformed JSON, wrong content type)."""

    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="palimpsest"'}


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ArtifactNotFound(NotFound):
    code = "artifact_not_found"


class StatisticNotFound(NotFound):
    code = "statistic_not_found"


class BatchNotFound(NotFound):
    code = "batch_not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class ModelNotReady(Conflict):
    code = "model_not_ready"


class JobFinished(Conflict):
    code = "job_finished"


class BatchFinished(Conflict):
    code = "batch_finished"


class JobNotFinished(Conflict):
    code = "job_not_finished"


class BatchNotFinished(Conflict):
    code = "batch_not_finished"


class InUse(Conflict):
    """Other rows depend on the one to delete (chained jobs, a model's jobs)."""
    code = "in_use"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class ServiceUnavailable(ApiError):
    """A dependency (database, broker, object store) cannot be reached: try again later."""

    status = 503
    code = "service_unavailable"
    headers = {"Retry-After": "5"}  # seconds; a database restart takes about that


# Stable codes for werkzeug's errors where the snake-cased name would read oddly.
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
}


def error_body(code: str, message: str, field: str | None = None, details: list | None = None) -> dict:
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    if details is not None:
        error["details"] = details
    return {"error": error}


def handle_api_error(error: ApiError):
    if error.status >= 500:
        log.error("%s: %s", error.code, error.message)
    return jsonify(error_body(error.code, error.message, error.field, error.details)), error.status, error.headers


def handle_http_exception(error: HTTPException):
    status = error.code or 500
    code = HTTP_CODES.get(status) or (error.name or "error").lower().replace(" ", "_")
    response = jsonify(error_body(code, error.description or error.name))
    response.status_code = status
    # Keep headers werkzeug adds for a reason (Allow on 405, Retry-After on 503).
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def handle_storage_unavailable(error):
    log.error("object store unavailable: %s", error)
    return handle_api_error(ServiceUnavailable("the object store is unavailable; try again later"))


def handle_database_unavailable(error):
    """The database refused or dropped the connection (it is restarting, say). The request's
    session is discarded now; SQLAlchemy has invalidated the broken connections, and the
    pool's pre-ping replaces them, so the API recovers by itself once the database is back."""
    from storage.db import close_session

    log.error("database unavailable: %s", str(error).splitlines()[0])
    close_session()
    return handle_api_error(ServiceUnavailable("the database is unavailable; try again later"))


def init_app(app):
    from sqlalchemy.exc import InterfaceError, OperationalError

    from storage.objects import StorageUnavailable

    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(StorageUnavailable, handle_storage_unavailable)
    app.register_error_handler(OperationalError, handle_database_unavailable)
    app.register_error_handler(InterfaceError, handle_database_unavailable)
    # Also catches unhandled exceptions, which Flask wraps in InternalServerError
    # (outside TESTING, where they propagate to the test instead).
    app.register_error_handler(HTTPException, handle_http_exception)
