"""GET/POST /v1/statistics: precompute once per (model sha256, layer, sample spec),
shared by tenants with the same bytes, invisible to the others."""
import pytest
from sqlalchemy import update

from storage.models import Statistic
from storage.statistics import parse_sample_spec, sample_spec
from v1_helpers import (  # noqa: F401
    LAYERS, add_model, add_statistic, alice, app, bob, client, config, model_sha256, queued, sessions,
)


@pytest.fixture
def model(app, alice):
    return add_model(app, alice.id)


def precompute(client, tenant, **body):
    return client.post("/v1/statistics", json=body, headers=tenant.headers)


def test_precompute_inserts_once_and_queues_once(app, client, alice, model):
    first = precompute(client, alice, model=model, layer="layer3", samples=1000)
    assert first.status_code == 202, first.json
    stat = first.json
    assert first.headers["Location"] == f"/v1/statistics/{stat['id']}"
    assert stat["sample_spec"] == sample_spec(1000) == "seeds:100000-101000"
    assert stat["samples"] == 1000 and stat["status"] == "pending" and stat["model"] == model
    assert stat["model_sha256"] == model_sha256(app, model)
    assert queued(app) == [("gpu", "workers.statistics.compute_statistic", [stat["id"]], 4)]
    again = precompute(client, alice, model=model, layer="layer3", samples=1000)
    assert again.status_code == 200 and again.json["id"] == stat["id"]
    assert len(queued(app)) == 1
    other = precompute(client, alice, model=model, layer="layer3", samples=2000)
    assert other.status_code == 202 and other.json["id"] != stat["id"]


def test_a_block_and_its_weight_module_share_one_statistic(app, client, alice):
    layers = [*LAYERS, {**LAYERS[0], "name": "layer3.conv"}]  # the block and the conv holding its keys
    model = add_model(app, alice.id, layers=layers)
    block = precompute(client, alice, model=model, layer="layer3", samples=100)
    assert block.status_code == 202 and block.json["layer"] == "layer3.conv"
    conv = precompute(client, alice, model=model, layer="layer3.conv", samples=100)
    assert conv.status_code == 200 and conv.json["id"] == block.json["id"]
    assert len(queued(app)) == 1
    for name in ("layer3", "layer3.conv"):
        listed = client.get(f"/v1/statistics?layer={name}", headers=alice.headers).json["statistics"]
        assert [s["id"] for s in listed] == [block.json["id"]]


def test_default_samples_are_what_jobs_use(app, client, alice, model):
    stat = precompute(client, alice, model=model, layer="layer4").json
    assert stat["sample_spec"] == sample_spec(app.config["PALIMPSEST_STAT_SAMPLES"])


@pytest.mark.parametrize("status, answer, sent", [("ready", 200, 0), ("computing", 200, 0), ("failed", 202, 1)])
def test_existing_statistic(app, client, alice, model, status, answer, sent):
    stat_id = add_statistic(app, model_sha256(app, model), "layer3", sample_spec(500), status=status)
    response = precompute(client, alice, model=model, layer="layer3", samples=500)
    assert response.status_code == answer and response.json["id"] == stat_id
    assert [m[2] for m in queued(app)] == [[stat_id]] * sent


def test_same_bytes_share_one_statistic_across_tenants(app, client, alice, bob, model):
    twin = add_model(app, bob.id, sha256=model_sha256(app, model))
    mine = precompute(client, alice, model=model, layer="layer3", samples=100).json
    theirs = precompute(client, bob, model=twin, layer="layer3", samples=100)
    assert theirs.status_code == 200 and theirs.json["id"] == mine["id"]
    assert theirs.json["model"] == twin  # named by a model bob can see
    assert len(queued(app)) == 1


def test_list_shows_only_statistics_of_visible_models(app, client, alice, bob, model):
    shared = add_model(app, None)
    mine = add_statistic(app, model_sha256(app, model), "layer3")
    common = add_statistic(app, model_sha256(app, shared), "layer4", status="pending")
    theirs = add_statistic(app, model_sha256(app, add_model(app, bob.id)), "layer3")

    def ids(tenant, query=""):
        response = client.get(f"/v1/statistics{query}", headers=tenant.headers)
        assert response.status_code == 200, response.json
        return {s["id"] for s in response.json["statistics"]}

    assert ids(alice) == {mine, common}
    assert ids(bob) == {common, theirs}
    assert ids(alice, f"?model={model}") == {mine}
    assert ids(alice, "?layer=layer4") == {common}
    assert ids(alice, "?status=ready") == {mine}
    assert ids(alice, f"?model={shared}&status=ready") == set()
    shown = client.get(f"/v1/statistics/{mine}", headers=alice.headers)
    assert shown.status_code == 200 and shown.json["model"] == model
    assert set(shown.json) == {"id", "model", "model_sha256", "layer", "sample_spec", "samples", "status", "count",
                               "size", "sha256", "error", "created_at", "updated_at"}
    hidden = client.get(f"/v1/statistics/{theirs}", headers=alice.headers)
    assert hidden.status_code == 404 and hidden.json["error"]["code"] == "statistic_not_found"


def test_ready_statistic_reports_count_and_size(app, client, alice, model):
    stat_id = add_statistic(app, model_sha256(app, model))
    with sessions(app) as session:
        session.execute(update(Statistic).where(Statistic.id == stat_id).values(count=6400, size=4224, sha256="a" * 64))
    stat = client.get(f"/v1/statistics/{stat_id}", headers=alice.headers).json
    assert (stat["count"], stat["size"], stat["sha256"], stat["samples"]) == (6400, 4224, "a" * 64, 100)


@pytest.mark.parametrize("body, status, code, field", [
    ({"layer": "layer3"}, 422, "validation_error", "model"),
    ({"model": "mdl_nope", "layer": "layer3"}, 422, "validation_error", "model"),
    ({"model": "@pending", "layer": "layer3"}, 409, "model_not_ready", "model"),
    ({"model": "@model", "layer": "layer9"}, 422, "unknown_layer", "layer"),
    ({"model": "@model"}, 422, "unknown_layer", "layer"),
    ({"model": "@model", "layer": "layer3", "samples": 0}, 422, "validation_error", "samples"),
    ({"model": "@model", "layer": "layer3", "samples": 900_001}, 422, "validation_error", "samples"),
    ({"model": "@model", "layer": "layer3", "samples": "lots"}, 422, "validation_error", "samples"),
    ({"model": "@model", "layer": "layer3", "seeds": "0-9"}, 422, "validation_error", "seeds"),
])
def test_invalid_precompute(app, client, alice, model, body, status, code, field):
    refs = {"@model": model, "@pending": add_model(app, alice.id, status="pending", layers=[])}
    body = {k: refs.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    response = precompute(client, alice, **body)
    assert response.status_code == status, response.json
    assert (response.json["error"]["code"], response.json["error"]["field"]) == (code, field)
    assert queued(app) == []


@pytest.mark.parametrize("query, field", [("status=done", "status"), ("colour=red", "colour")])
def test_bad_list_queries(client, alice, query, field):
    response = client.get(f"/v1/statistics?{query}", headers=alice.headers)
    assert response.status_code == 422 and response.json["error"]["field"] == field


def test_sample_specs():
    assert sample_spec(1) == "seeds:100000-100001"
    assert parse_sample_spec(sample_spec(5000)) == range(100_000, 105_000)
    assert sample_spec(10, start=0) == "seeds:0-10"
    for bad in (0, -1, 900_001, True, 2.0):
        with pytest.raises(ValueError):
            sample_spec(bad)
    for bad in ("seeds:5-5", "seeds:9-1", "demo:n=10", "seeds:0-", None):
        with pytest.raises(ValueError):
            parse_sample_spec(bad)

