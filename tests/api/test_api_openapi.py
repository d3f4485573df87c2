import json
import re

from api import openapi


def openapi_path(rule: str) -> str:
    """Flask ``/v1/jobs/<int:job_id>`` -> OpenAPI ``/v1/jobs/{job_id}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_document_is_openapi_3_1(client):
    response = client.get("/v1/openapi.json")
    assert response.status_code == 200
    doc = response.json
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"] == "Palimpsest"
    assert doc["components"]["schemas"]["Error"]["required"] == ["error"]


def test_every_v1_route_is_documented_with_its_methods(app):
    doc = openapi.document(app)
    rules = [r for r in app.url_map.iter_rules() if r.rule.startswith("/v1/")]
    assert {"/v1/healthz", "/v1/readyz", "/v1/openapi.json"} <= {r.rule for r in rules}
    for rule in rules:
        path = openapi_path(rule.rule)
        assert path in doc["paths"], f"{rule.rule} missing from the OpenAPI document"
        documented = set(doc["paths"][path])
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in documented, f"{method} {rule.rule} missing from the OpenAPI document"


def test_document_has_no_routes_that_do_not_exist(app):
    served = {openapi_path(r.rule) for r in app.url_map.iter_rules()}
    assert set(openapi.document(app)["paths"]) <= served


def test_every_ref_resolves(app):
    doc = openapi.document(app)
    refs = re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(doc))
    assert refs
    for ref in refs:
        node = doc
        for part in ref.split("/"):
            node = node[part]


def test_docs_page_links_the_document(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert 'href="/v1/openapi.json"' in page  # usable offline: the raw document is one click away
    assert 'url: "/v1/openapi.json"' in page


def test_every_operation_with_a_key_documents_503_with_retry_after(app):
    doc = openapi.document(app)
    unavailable = doc["components"]["responses"]["Unavailable"]
    assert "Retry-After" in unavailable["headers"]
    secured = [(path, method, op) for path, ops in doc["paths"].items() for method, op in ops.items()
               if op.get("security")]
    assert len(secured) >= 18
    for path, method, op in secured:
        assert op["responses"]["503"] == {"$ref": "#/components/responses/Unavailable"}, f"{method} {path}"


def test_a_database_outage_answers_503_with_retry_after(app, client, monkeypatch):
    from sqlalchemy.exc import OperationalError

    import api.auth

    def down(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(api.auth, "tenant_for_key", down)
    response = client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert response.json["error"]["code"] == "service_unavailable"
