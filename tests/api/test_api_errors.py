"""Every error is JSON ``{"error": {"code", "message", "field"?}}`` with a stable code."""
import pytest

from api import create_app, errors


@pytest.fixture
def app(config):
    app = create_app(config)

    @app.post("/_test/echo")
    def echo():
        from flask import request

        return {"size": len(request.get_data())}

    @app.get("/_test/raise/<name>")
    def raise_error(name):
        error_class = getattr(errors, name)
        raise error_class("something about the layer", field="layer" if name == "ValidationError" else None)

    @app.get("/_test/crash")
    def crash():
        raise RuntimeError("bug")

    return app


@pytest.mark.parametrize("name, status, code", [
    ("ValidationError", 422, "validation_error"),
    ("Unauthorized", 401, "unauthorized"),
    ("Forbidden", 403, "forbidden"),
    ("NotFound", 404, "not_found"),
    ("Conflict", 409, "conflict"),
    ("PayloadTooLarge", 413, "payload_too_large"),
    ("ServiceUnavailable", 503, "service_unavailable"),
])
def test_api_errors_render_status_and_code(client, name, status, code):
    response = client.get(f"/_test/raise/{name}")
    assert response.status_code == status
    assert response.is_json
    expected = {"code": code, "message": "something about the layer"}
    if name == "ValidationError":
        expected["field"] = "layer"
    assert response.json == {"error": expected}


def test_subclass_keeps_status_with_its_own_code():
    class JobNotFound(errors.NotFound):
        code = "job_not_found"

    assert (JobNotFound.status, JobNotFound.code) == (404, "job_not_found")


@pytest.mark.parametrize("method, path, status, code", [
    ("get", "/v1/no-such-route", 404, "not_found"),
    ("get", "/no-such-route", 404, "not_found"),
    ("post", "/v1/healthz", 405, "method_not_allowed"),
    ("delete", "/v1/readyz", 405, "method_not_allowed"),
])
def test_werkzeug_errors_are_json(client, method, path, status, code):
    response = getattr(client, method)(path)
    assert response.status_code == status
    assert response.is_json
    assert response.json["error"]["code"] == code
    assert response.json["error"]["message"]


def test_405_keeps_allow_header(client):
    response = client.post("/v1/healthz")
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "HEAD"}


def test_body_over_the_limit_is_413_json(client, app):
    response = client.post("/_test/echo", data=b"x" * (app.config["MAX_CONTENT_LENGTH"] + 1))
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"
    assert client.post("/_test/echo", data=b"x" * 10).json == {"size": 10}


def test_unhandled_exception_is_500_json_outside_testing(app):
    app.testing = False  # under TESTING Flask re-raises into the test instead
    response = app.test_client().get("/_test/crash")
    assert response.status_code == 500
    assert response.json["error"]["code"] == "internal_error"
    assert "bug" not in response.json["error"]["message"]  # no internals leak to clients
