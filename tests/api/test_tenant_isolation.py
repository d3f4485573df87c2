"""Tenant isolation on every route of the URL map: tenant B, holding a valid key, calls
each route on tenant A's resources and gets 404 (never 200, never 403), exactly as
for a resource that does not exist. A route added later is covered automatically;
one with a path parameter this test cannot fill fails it, so it cannot slip through."""
import json
import re

import pytest

from api.auth import PUBLIC_ENDPOINTS
from storage.models import BatchMerge
from v1_helpers import (  # noqa: F401
    EDIT, add_artifact, add_job, add_model, add_statistic, alice, app, bob, client, config, model_sha256, queued,
    safetensors_bytes, sessions,
)

PARAMETER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


class Jsonl(str):
    """A batch body (JSONL lines) in the ``references`` table."""


def jsonl(*lines: dict) -> Jsonl:
    return Jsonl("\n".join(json.dumps(line) for line in lines))


def post(client, path, body, tenant):
    if isinstance(body, Jsonl):
        return client.post(path, data=str(body), content_type="application/jsonl", headers=tenant.headers)
    return client.post(path, json=body, headers=tenant.headers)


def refused_field(response) -> str:
    """The field a 422 blames; for a batch, the field of its (one) bad line."""
    error = response.json["error"]
    return error["details"][0]["field"] if error.get("details") else error["field"]


@pytest.fixture
def a_resources(app, client, alice):
    """Tenant A's private model, a succeeded job on it with an artifact, a running job, a
    statistic, and a batch (one member) with a merge and its checkpoint file."""
    model = add_model(app, alice.id)
    job = add_job(app, alice.id, model, "succeeded")
    sha256 = add_artifact(app, job, "checkpoint", b"weights of alice")
    running = add_job(app, alice.id, model, "running")
    statistic = add_statistic(app, model_sha256(app, model))
    batch = post(client, "/v1/batches", jsonl({"custom_id": "a1", "model": model, "layer": "layer3", "request": EDIT}),
                 alice)
    assert batch.status_code == 202, batch.json
    with sessions(app) as session:
        merge = BatchMerge(batch_id=batch.json["id"], model_id=model, model_sha256=model_sha256(app, model),
                           layer="layer3", status="succeeded", rules=1, checkpoint_sha256=sha256,
                           checkpoint_object_key=f"artifacts/{sha256}/checkpoint.bin")
        session.add(merge)
        session.flush()
        merge_id = merge.id
    return {"model_id": model, "job_id": job, "running_job_id": running, "name": "checkpoint",
            "statistic_id": statistic, "batch_id": batch.json["id"], "merge_id": merge_id}


def routes(app):
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/v1/") and rule.endpoint not in PUBLIC_ENDPOINTS:
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                yield method, rule


def fill(rule, values: dict) -> str:
    def value(match):
        name = match.group(1)
        assert name in values, f"{rule.rule}: add a resource of tenant A for <{name}> to this test"
        return values[name]

    return PARAMETER.sub(value, rule.rule)


def redact(text: str, values: dict) -> str:
    for value in sorted(values.values(), key=len, reverse=True):
        text = text.replace(value, "<id>")
    return text


def test_every_resource_route_is_404_for_another_tenant(app, client, alice, bob, a_resources):
    checked = []
    # deletes last, as the owner's delete may take the resource the other routes use
    for method, rule in sorted(routes(app), key=lambda route: route[0] == "DELETE"):
        if not rule.arguments:
            continue
        url = fill(rule, a_resources)
        as_other = client.open(url, method=method, headers=bob.headers)
        assert as_other.status_code == 404, f"{method} {url} as another tenant: {as_other.status_code}"
        # while the owner reaches it (409: cancelling a finished job, deleting a model jobs name)
        as_owner = client.open(url, method=method, headers=alice.headers)
        assert as_owner.status_code in (200, 204, 302, 409), f"{method} {url} as the owner: {as_owner.status_code}"
        # word for word what a resource that does not exist gets, once the ids are set aside
        unknown = {k: f"{v}0" for k, v in a_resources.items()}
        missing = client.open(fill(rule, unknown), method=method, headers=bob.headers)
        assert redact(as_other.get_data(as_text=True), a_resources) == redact(missing.get_data(as_text=True), unknown)
        checked.append(f"{method} {rule.rule}")
    assert len(checked) >= 10, checked  # models, jobs, cancel, events, artifacts, statistics, batches


def test_running_job_cannot_be_cancelled_by_another_tenant(app, client, alice, bob, a_resources):
    job = a_resources["running_job_id"]
    assert client.post(f"/v1/jobs/{job}/cancel", headers=bob.headers).status_code == 404
    assert client.get(f"/v1/jobs/{job}", headers=alice.headers).json["cancel_requested"] is False


def test_lists_show_nothing_of_another_tenant(app, client, alice, bob, a_resources):
    """Every collection route (GET, no path parameter) as B: none of A's ids appear,
    whatever the filters (even naming A's model or batch)."""
    checked = []
    for method, rule in routes(app):
        if rule.arguments or method != "GET":
            continue
        for query in ("", f"?model={a_resources['model_id']}", f"?batch={a_resources['batch_id']}"):
            response = client.get(rule.rule + query, headers=bob.headers)
            if query and response.status_code == 422 and response.json["error"]["field"] == query[1:].split("=")[0]:
                continue  # a route without this filter cannot leak through it
            assert response.status_code == 200, f"GET {rule.rule}{query}: {response.status_code}"
            body = response.get_data(as_text=True)
            for value in a_resources.values():
                if value != "checkpoint":
                    assert value not in body, f"GET {rule.rule}{query} shows {value}"
        checked.append(rule.rule)
    assert {"/v1/jobs", "/v1/models", "/v1/statistics", "/v1/batches"} <= set(checked)


# What B may send to each collection POST that names A's resources. A new POST route must
# be added here (the test fails otherwise).
def references(a, alice_id):
    return {
        "/v1/jobs": [
            ({"model": a["model_id"], "layer": "layer3", "request": EDIT}, "model"),
            ({"model": "@shared", "layer": "layer3", "request": EDIT, "base": {"job": a["job_id"]}}, "base.job"),
        ],
        "/v1/statistics": [({"model": a["model_id"], "layer": "layer3"}, "model")],
        "/v1/models": [({"object_key": f"tenants/{alice_id}/models/x/model.safetensors"}, "object_key")],
        "/v1/batches": [
            (jsonl({"custom_id": "b1", "model": a["model_id"], "layer": "layer3", "request": EDIT}), "model"),
            (jsonl({"custom_id": "b1", "model": "@shared", "layer": "layer3", "request": EDIT}), None),  # accepted
        ],
    }


def test_bodies_naming_another_tenants_resources_read_as_unknown(app, client, alice, bob, a_resources):
    shared = add_model(app, None)
    table = references(a_resources, alice.id)
    before, accepted = queued(app), 0
    for method, rule in routes(app):
        if rule.arguments or method != "POST":
            continue
        assert rule.rule in table, f"POST {rule.rule}: add the references tenant B could send to this test"
        for body, field in table[rule.rule]:
            if isinstance(body, Jsonl):
                body = Jsonl(body.replace("@shared", shared))
            else:
                body = {k: shared if v == "@shared" else v for k, v in body.items()}
            response = post(client, rule.rule, body, bob)
            if field is None:  # the control: the same line on a model B may use is accepted
                assert response.status_code == 202, (rule.rule, response.json)
                accepted += 1
                continue
            assert response.status_code == 422, (rule.rule, response.json)
            assert refused_field(response) == field
            # word for word the answer for ids that exist nowhere
            ids = {**a_resources, "tenant": alice.id}
            unknown = {k: f"{v}0" for k, v in ids.items()}
            text = body if isinstance(body, Jsonl) else json.dumps(body)
            for name, value in ids.items():
                text = text.replace(value, unknown[name])
            other = post(client, rule.rule, Jsonl(text) if isinstance(body, Jsonl) else json.loads(text), bob)
            assert redact(other.get_data(as_text=True), unknown) == redact(response.get_data(as_text=True), ids)
    assert len(queued(app)) == len(before) + accepted  # nothing but the controls' members


def test_same_bytes_do_not_reveal_the_other_tenants_model(app, client, alice, bob, a_resources):
    """B uploading A's exact checkpoint bytes sees the shared statistic, named by B's model, never A's."""
    twin = add_model(app, bob.id, sha256=model_sha256(app, a_resources["model_id"]))
    stats = client.get("/v1/statistics", headers=bob.headers).json["statistics"]
    assert [s["model"] for s in stats] == [twin]
