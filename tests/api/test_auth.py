"""Bearer keys: every /v1 route but the public ones answers 401 without a valid key
(routes taken from the URL map, so a new one cannot slip through); keys are stored
only as sha256 digests."""
import re
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, select, text, update

from api.auth import PUBLIC_ENDPOINTS, key_sha256
from palimpsest.cli import main
from storage.models import ApiKey, Tenant, utcnow
from v1_helpers import Tenant as TestTenant
from v1_helpers import alice, app, bob, client, config, sessions  # noqa: F401


def protected_routes(app):
    """(method, url) of every /v1 route that needs a key, path parameters filled in."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/v1/") or rule.endpoint in PUBLIC_ENDPOINTS:
            continue
        url = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"x_\1", rule.rule)
        routes += [(method, url) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return routes


def test_there_are_protected_routes(app):
    urls = {url for _, url in protected_routes(app)}
    assert {"/v1/jobs", "/v1/models", "/v1/statistics", "/v1/jobs/x_job_id/artifacts/x_name"} <= urls


BAD_HEADERS = [
    ("missing", {}),
    ("empty-bearer", {"Authorization": "Bearer "}),
    ("basic", {"Authorization": "Basic YWxpY2U6c2VjcmV0"}),
    ("not-a-key", {"Authorization": "Bearer hello"}),
    ("unknown-key", {"Authorization": "Bearer plm_0123456789ab_" + "A" * 43}),
]


@pytest.mark.parametrize("headers", [h for _, h in BAD_HEADERS], ids=[n for n, _ in BAD_HEADERS])
def test_every_protected_route_is_401_without_a_valid_key(app, client, alice, headers):
    for method, url in protected_routes(app):
        response = client.open(url, method=method, headers=headers, json={})
        assert response.status_code == 401, f"{method} {url}: {response.status_code}"
        assert response.json["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_right_prefix_wrong_secret_is_401(client, alice):
    prefix = alice.key.split("_")[1]
    forged = f"plm_{prefix}_{'B' * 43}"
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    assert client.get("/v1/jobs", headers=alice.headers).status_code == 200


def test_scheme_is_case_insensitive(client, alice):
    assert client.get("/v1/jobs", headers={"Authorization": f"bearer {alice.key}"}).status_code == 200


def test_revoked_key_is_401(app, client, alice):
    with sessions(app) as session:
        session.execute(update(ApiKey).where(ApiKey.tenant_id == alice.id).values(revoked_at=utcnow()))
    assert client.get("/v1/models", headers=alice.headers).status_code == 401


@pytest.mark.parametrize("url", ["/v1/healthz", "/v1/readyz", "/v1/openapi.json", "/docs"])
def test_public_routes_need_no_key(client, url):
    assert client.get(url).status_code == 200


def test_unknown_routes_stay_404_and_wrong_methods_405(client):
    assert client.get("/v1/nothing-here").status_code == 404
    assert client.delete("/v1/jobs").status_code == 405


def test_keys_are_hashed_at_rest(app, alice, bob):
    """The clear key (or its secret part) appears nowhere in the database; its sha256 does."""
    dump = []
    engine = app.extensions["palimpsest_db"].engine
    with engine.connect() as connection:
        for table in inspect(engine).get_table_names():
            for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                dump.append(" ".join(str(value) for value in row))
    everything = "\n".join(dump)
    for tenant in (alice, bob):
        secret = tenant.key.rsplit("_", 1)[1]
        assert tenant.key not in everything and secret not in everything
        assert key_sha256(tenant.key) in everything


def test_create_key_reuses_the_tenant(app):
    first, second = TestTenant(app, "carol"), TestTenant(app, "carol")
    assert first.id == second.id and first.key != second.key
    with sessions(app) as session:
        assert len(session.scalars(select(Tenant).where(Tenant.name == "carol")).all()) == 1
        assert len(session.scalars(select(ApiKey).where(ApiKey.tenant_id == first.id)).all()) == 2


def test_keys_create_command(app, client, config, monkeypatch):
    monkeypatch.setenv("PALIMPSEST_DATABASE_URL", config["PALIMPSEST_DATABASE_URL"])
    monkeypatch.setenv("PALIMPSEST_DATA_DIR", config["PALIMPSEST_DATA_DIR"])
    result = CliRunner().invoke(main, ["keys", "create", "--tenant", "dave"])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert re.fullmatch(r"plm_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key)
    assert "dave" in result.stderr
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    again = CliRunner().invoke(main, ["keys", "create", "--tenant", "dave", "--name", "ci"])
    with sessions(app) as session:
        tenant_ids = {row.tenant_id for row in session.scalars(select(ApiKey))}
        names = {row.name for row in session.scalars(select(ApiKey))}
    assert again.exit_code == 0 and len(tenant_ids) == 1 and names == {None, "ci"}


def test_keys_list_and_revoke_commands(app, client, config, monkeypatch):
    monkeypatch.setenv("PALIMPSEST_DATABASE_URL", config["PALIMPSEST_DATABASE_URL"])
    monkeypatch.setenv("PALIMPSEST_DATA_DIR", config["PALIMPSEST_DATA_DIR"])
    keys = [CliRunner().invoke(main, ["keys", "create", "--tenant", "erin", "--name", n]).stdout.strip()
            for n in ("laptop", "ci")]
    listed = CliRunner().invoke(main, ["keys", "list", "--tenant", "erin"])
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert [line.split("\t")[2] for line in lines] == ["laptop", "ci"]
    assert all(line.endswith("live") for line in lines) and not any(k in listed.stdout for k in keys)
    prefix = lines[0].split("\t")[1]  # plm_<12 hex>
    assert keys[0].startswith(prefix + "_")

    assert CliRunner().invoke(main, ["keys", "revoke", prefix]).exit_code == 0
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {keys[0]}"}).status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {keys[1]}"}).status_code == 200
    assert CliRunner().invoke(main, ["keys", "revoke", keys[1]]).exit_code == 0  # the whole key works too
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {keys[1]}"}).status_code == 401
    again = CliRunner().invoke(main, ["keys", "revoke", prefix])
    assert again.exit_code == 1 and "no live key" in again.output
    assert "revoked" in CliRunner().invoke(main, ["keys", "list", "--tenant", "erin"]).stdout


def test_keys_are_checked_on_each_request_not_cached(app, client, alice):
    assert client.get("/v1/jobs", headers=alice.headers).status_code == 200
    with sessions(app) as session:
        session.execute(update(ApiKey).where(ApiKey.tenant_id == alice.id)
                        .values(revoked_at=utcnow() - timedelta(seconds=1)))
    assert client.get("/v1/jobs", headers=alice.headers).status_code == 401
