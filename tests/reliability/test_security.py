"""Security (issue 7, item 8).

- Tenant isolation on every route of the app's URL map: the tests of
  tests/api/test_tenant_isolation.py (a route added later fails them until it is
  covered), run here again on PostgreSQL.
- API keys are hashed at rest: after keys are made and used, a full ``pg_dump`` of the
  database holds neither a clear key nor its secret part (it does hold the sha256).
- Presigned URLs expire after ``PALIMPSEST_PRESIGN_SECONDS`` (2 s here), against the
  moto S3 server. moto itself does not check a presigned URL's expiry, so it runs behind
  a small front that refuses expired ones as S3 does (403, "Request has expired"); the
  test proves that the URLs the API hands out carry the configured lifetime and stop
  working after it.
- Object keys cannot leave the tenant's prefix: registering a model by key, with every
  way out we know ('..', absolute, URL-encoded, backslashes, another tenant whose id
  starts with ours), on the file store and on S3.
- The server fetches no URL a client gives, except webhooks to allow-listed hosts: a
  real server and worker, with every string field we could find pointing at a local
  recording server (and HTTP(S)_PROXY pointing there too), run their jobs; the recorder
  sees nothing, and the allow-listed receiver sees exactly the signed webhooks.
"""
import hashlib
import io
import json
import subprocess
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import requests
from sqlalchemy import func, select

from api import create_app
from palimpsest.client import Client
from palimpsest.webhooks import SIGNATURE_HEADER, verify
from stack import embedded_stack, wait_until
from storage import migrate
from storage.models import Model, Tenant as TenantRow
from test_tenant_isolation import (  # noqa: F401  the URL-map isolation tests, collected here on PostgreSQL
    a_resources,
    test_bodies_naming_another_tenants_resources_read_as_unknown,
    test_every_resource_route_is_404_for_another_tenant,
    test_lists_show_nothing_of_another_tenant,
    test_running_job_cannot_be_cancelled_by_another_tenant,
    test_same_bytes_do_not_reveal_the_other_tenants_model,
)
from job_fixtures import save_generator
from v1_helpers import Tenant, add_artifact, add_job, add_model, alice, app, bob, client, sessions  # noqa: F401


@pytest.fixture
def config(tmp_path, empty_postgres_url):
    """The /v1 tests' app (tests/api/v1_helpers.py), on a fresh PostgreSQL database."""
    migrate.upgrade(empty_postgres_url)
    return {**embedded_stack(tmp_path).settings.as_flask_config(), "TESTING": True,
            "PALIMPSEST_DATABASE_URL": empty_postgres_url}


# -- API keys at rest ----------------------------------------------------------------------------

def test_api_keys_are_hashed_at_rest(tmp_path, empty_postgres_url):
    stack = embedded_stack(tmp_path)
    stack.variables["PALIMPSEST_DATABASE_URL"] = empty_postgres_url
    stack.migrate()
    keys = []
    for tenant in ("acme", "acme", "globex"):
        done = subprocess.run(stack.palimpsest("keys", "create", "--tenant", tenant, "--name", "ci"),
                              env=stack.env, capture_output=True, text=True, timeout=120, check=True)
        keys.append(done.stdout.strip())
    app = create_app({**stack.settings.as_flask_config(), "TESTING": True})
    client = app.test_client()
    for key in keys:  # used, so that anything a request might record about its key is in the dump
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.post("/v1/jobs", json={"model": "x"}, headers={"Authorization": f"Bearer {key}"}).status_code \
            == 422
    dump = subprocess.run(["pg_dump", "--no-owner", empty_postgres_url.replace("+psycopg", "")],
                          capture_output=True, text=True, timeout=120, check=True).stdout
    assert "CREATE TABLE public.api_keys" in dump
    for key in keys:
        prefix, secret = key.split("_")[1], key.split("_", 2)[2]
        assert key not in dump and secret not in dump
        assert hashlib.sha256(key.encode()).hexdigest() in dump  # what is kept instead
        assert prefix in dump  # the lookup prefix is kept by design: it is no use without the secret
    for key in keys:  # and the data directory holds no copy either
        for path in stack.data_dir.rglob("*"):
            if path.is_file():
                assert key.encode() not in path.read_bytes(), path


# -- presigned URLs expire -------------------------------------------------------------------

PRESIGN_SECONDS = 2


class ExpiringPresign:
    """WSGI front for moto: refuse a presigned request past X-Amz-Date + X-Amz-Expires (as S3 does)."""

    def __init__(self, app):
        self.app = app
        self.refused = 0

    def __call__(self, environ, start_response):
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if "X-Amz-Signature" in query:
            signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
            if time.time() > signed.timestamp() + int(query["X-Amz-Expires"][0]):
                self.refused += 1
                start_response("403 Forbidden", [("Content-Type", "application/xml")])
                return [b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"]
        return self.app(environ, start_response)


@pytest.fixture
def expiring_s3(aws_test_credentials):
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    front = ExpiringPresign(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, front, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", front
    finally:
        server.shutdown()
        thread.join()


def test_presigned_urls_expire_after_the_configured_time(tmp_path, sqlite_url, expiring_s3, monkeypatch):
    endpoint, front = expiring_s3
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="presign-test")
    monkeypatch.setenv("PALIMPSEST_PRESIGN_SECONDS", str(PRESIGN_SECONDS))  # read as a deployment would
    for name, value in embedded_stack(tmp_path).variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PALIMPSEST_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("PALIMPSEST_STORAGE_URL", "s3://presign-test/objects")
    monkeypatch.setenv("PALIMPSEST_S3_ENDPOINT_URL", endpoint)
    app = create_app({"TESTING": True})
    assert app.config["PALIMPSEST_PRESIGN_SECONDS"] == PRESIGN_SECONDS
    owner = Tenant(app, "presign")
    job = add_job(app, owner.id, add_model(app, owner.id), "succeeded")
    add_artifact(app, job, "checkpoint", b"weights")

    response = app.test_client().get(f"/v1/jobs/{job}/artifacts/checkpoint", headers=owner.headers)
    assert response.status_code == 302
    url = response.headers["Location"]
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == [str(PRESIGN_SECONDS)]
    assert "X-Amz-Signature" in query  # SigV4: X-Amz-Expires is signed, a client cannot stretch it
    issued = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
    assert abs(issued - time.time()) < 5

    fresh = requests.get(url, timeout=10)
    assert (fresh.status_code, fresh.content) == (200, b"weights")
    time.sleep(max(0.0, issued + PRESIGN_SECONDS + 1.5 - time.time()))  # X-Amz-Date has whole seconds
    expired = requests.get(url, timeout=10)
    assert expired.status_code == 403 and b"Request has expired" in expired.content
    assert front.refused == 1
    # a new request to the API hands out a new URL, which works again
    again = app.test_client().get(f"/v1/jobs/{job}/artifacts/checkpoint", headers=owner.headers)
    assert requests.get(again.headers["Location"], timeout=10).content == b"weights"


# -- object keys stay in the tenant's space --------------------------------------------------------

def escapes(me: str, other: str, twin: str) -> list:
    """Keys tenant ``me`` may try, for an object of tenant ``other``; ``twin`` is a tenant
    whose id is ``me`` with one more character (a prefix test without the slash would pass it)."""
    target = f"{other}/incoming/gan.safetensors"
    return [
        f"tenants/{target}",
        f"tenants/{twin}/incoming/gan.safetensors",
        f"tenants/{me}/../{target}",
        f"tenants/{me}/./../{target}",
        f"tenants/{me}//../{target}",
        f"/tenants/{target}",
        f"//tenants/{target}",
        f"/tenants/{me}/../{target}",
        f"tenants/{me}/%2e%2e/{target}",
        f"tenants/{me}/%2E%2E%2F{other}%2Fincoming%2Fgan.safetensors",
        f"tenants/{me}/..%2F{target}",
        f"tenants/{me}/%252e%252e/{target}",
        f"tenants%2F{target}",
        f"tenants/{me}\\..\\{other}\\incoming\\gan.safetensors",
        f"tenants\\{target}",
        f"tenants/{me}/..\x00/{target}",
        f"tenants/{me}/\n/../{target}",
        f" tenants/{me}/../{target}",
        f"tenants/{me}",
        f"tenants/{me}/",
        "shared/models/" + "0" * 64 + "/model.safetensors",
        f"s3://palimpsest/objects/tenants/{target}",
        f"file:///tenants/{target}",
        f"objects/tenants/{target}",
        7, None, [f"tenants/{me}/x"], {"key": f"tenants/{me}/x"},
    ]


@pytest.fixture(params=["file", "s3"])
def any_store_app(request, tmp_path, sqlite_url):
    config = {**embedded_stack(tmp_path).settings.as_flask_config(), "TESTING": True,
              "PALIMPSEST_DATABASE_URL": sqlite_url}
    if request.param == "s3":
        config.update(PALIMPSEST_STORAGE_URL=request.getfixturevalue("s3_storage_url"),
                      PALIMPSEST_S3_ENDPOINT_URL=request.getfixturevalue("s3_server"))
    return create_app(config)


def test_object_keys_cannot_leave_the_tenants_space(any_store_app, tmp_path):
    app = any_store_app
    me, other = Tenant(app, "me"), Tenant(app, "other")
    with sessions(app) as session:
        session.add(TenantRow(id=me.id + "x", name="twin"))
    twin = me.id + "x"
    data = save_generator(tmp_path / "gan.safetensors").read_bytes()
    store = app.extensions["palimpsest_store"]
    for owner in (other.id, twin):  # valid checkpoints: a key that reached them would be accepted
        store.put(f"tenants/{owner}/incoming/gan.safetensors", io.BytesIO(data))
    client = app.test_client()
    for key in escapes(me.id, other.id, twin):
        response = client.post("/v1/models", json={"object_key": key}, headers=me.headers)
        assert response.status_code == 422, (key, response.json)
        assert response.json["error"]["field"] == "object_key", (key, response.json)
    with sessions(app) as session:
        assert session.scalar(select(func.count()).select_from(Model)) == 0
    # the control: the same bytes inside my own space are registered
    store.put(f"tenants/{me.id}/incoming/gan.safetensors", io.BytesIO(data))
    response = client.post("/v1/models", json={"object_key": f"tenants/{me.id}/incoming/gan.safetensors"},
                           headers=me.headers)
    assert response.status_code == 202, response.json


# -- no fetch of a client's URL but allow-listed webhooks --------------------------------------

class Recorder(ThreadingHTTPServer):
    """An HTTP server on loopback that answers 200 to anything and records each request."""

    daemon_threads = True

    def __init__(self):
        self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def _record(handler):
                length = int(handler.headers.get("Content-Length") or 0)
                body = handler.rfile.read(length) if length else b""
                self.hits.append((handler.command, handler.path, dict(handler.headers), body))
                handler.send_response(200)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

            do_GET = do_POST = do_PUT = do_HEAD = do_CONNECT = do_DELETE = do_PATCH = do_OPTIONS = _record

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def recorders():
    trap, receiver = Recorder(), Recorder()
    try:
        yield trap, receiver
    finally:
        for server in (trap, receiver):
            server.shutdown()
            server.server_close()


SECRET = "webhook-test-secret"


def test_no_client_url_is_fetched_but_allow_listed_webhooks(tmp_path, recorders):
    """Jobs, models, statistics and batches submitted with URLs of a recording server in
    every string field; the allow-list holds only ``localhost`` (the receiver), the trap
    listens on 127.0.0.1. After the jobs have run, the trap saw nothing."""
    trap, receiver = recorders
    url = f"http://127.0.0.1:{trap.port}"
    requests.get(f"{url}/control", timeout=5)  # the recorder records: a request reaching it shows
    assert [hit[1] for hit in trap.hits] == ["/control"]
    trap.hits.clear()
    stack = embedded_stack(tmp_path)
    stack.variables.update({
        "PALIMPSEST_WEBHOOK_ALLOWED_HOSTS": "localhost",
        "PALIMPSEST_WEBHOOK_SECRET": SECRET,
        "PALIMPSEST_WEBHOOK_RETRY_SECONDS": "1",
        # anything that honours proxy variables and makes a request goes to the trap
        "HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url, "NO_PROXY": "", "no_proxy": "",
    })
    stack.migrate()
    try:
        stack.start_worker()
        server = stack.start_server()
        key = subprocess.run(stack.palimpsest("keys", "create", "--tenant", "ssrf"), env=stack.env, check=True,
                             capture_output=True, text=True).stdout.strip()
        api = Client(server.url, key)
        headers = {"Authorization": f"Bearer {key}", "Referer": f"{url}/referer", "Origin": url,
                   "X-Forwarded-Host": f"127.0.0.1:{trap.port}", "Forwarded": f"host=127.0.0.1:{trap.port}",
                   "Link": f"<{url}/link>; rel=preload"}
        model = api.upload_model(save_generator(tmp_path / "gan.safetensors"), name=f"{url}/model-name")
        model_id = wait_until(lambda: (m := api.request("GET", f"/v1/models/{model['id']}").json())["status"]
                              != "pending" and m, 120)["id"]
        assert api.request("GET", f"/v1/models/{model_id}").json()["status"] == "ready"

        def post(path, **kwargs):
            return requests.post(f"{server.url}{path}", headers={**headers, **kwargs.pop("headers", {})},
                                 timeout=30, **kwargs)

        hook = f"http://localhost:{receiver.port}/hook"
        edit = {"operation": "copy", "copy": {"seed": 1, "mask": [0, 0, 0.5, 0.5]},
                "paste": {"seed": 2, "mask": [0.5, 0.5, 1, 1]}}
        small = {"samples": 16, "steps": 3, "held_out": 1}
        # refused: a URL where an id, a layer, a mask, a class, a key or an address is expected
        refused = [
            ("/v1/jobs", {"json": {"model": f"{url}/model", "layer": "layer3", "request": edit}}),
            ("/v1/jobs", {"json": {"model": model_id, "layer": f"{url}/layer", "request": edit}}),
            ("/v1/jobs", {"json": {"model": model_id, "layer": "layer3",
                                   "request": {**edit, "paste": {"seed": 2, "mask": f"{url}/mask.png"}}}}),
            ("/v1/jobs", {"json": {"model": model_id, "layer": "layer3",
                                   "request": {"object": [1, f"{url}/o.png"], "paste": [2, f"{url}/p.png"],
                                               "key": [[3, f"{url}/k.png"]]}}}),
            ("/v1/jobs", {"json": {"model": model_id, "layer": "layer3", "request": edit,
                                   "base": {"job": f"{url}/job"}}}),
            ("/v1/jobs", {"json": {"model": model_id, "layer": "layer3", "request": edit, "webhook": f"{url}/hook"}}),
            ("/v1/jobs", {"json": {"model": model_id, "layer": "layer3", "request": edit,
                                   "webhook": f"http://localhost@127.0.0.1:{trap.port}/hook"}}),
            ("/v1/jobs", {"json": {"model": model_id, "layer": "layer3", "request": edit,
                                   "webhook": f"http://127.0.0.1:{trap.port}#@localhost/hook"}}),
            ("/v1/jobs", {"json": {"model": model_id, "layer": "layer3", "request": edit, "params": {"lr": url}}}),
            ("/v1/models", {"json": {"object_key": f"{url}/model.safetensors"}}),
            ("/v1/models", {"json": {"object_key": f"tenants/x/{url}/model.safetensors"}}),
            ("/v1/statistics", {"json": {"model": f"{url}/m", "layer": "layer3"}}),
            ("/v1/statistics", {"json": {"model": model_id, "layer": f"{url}/layer"}}),
            ("/v1/batches?webhook=" + requests.utils.quote(f"{url}/batch-hook"),
             {"data": json.dumps({"custom_id": "x", "model": model_id, "layer": "layer3", "request": edit}),
              "headers": {"Content-Type": "application/jsonl"}}),
            ("/v1/batches", {"data": json.dumps({"custom_id": "x", "model": f"{url}/m", "layer": "layer3",
                                                 "request": edit}),
                             "headers": {"Content-Type": "application/jsonl"}}),
        ]
        for path, kwargs in refused:
            response = post(path, **kwargs)
            assert response.status_code in (400, 422), (path, kwargs, response.text)
        # accepted, and run: a URL where free text is allowed, in headers, and webhooks to the allowed host
        jobs = [
            post("/v1/jobs", json={"model": model_id, "layer": "layer3", "request": edit, "params": small,
                                   "webhook": hook}, headers={"Idempotency-Key": f"{url}/idempotency"}),
            post("/v1/jobs", json={"model": model_id, "layer": "layer3", "request": edit,
                                   "params": {**small, "source_class": f"{url}/class"}}),
        ]
        assert [job.status_code for job in jobs] == [202, 202], [job.text for job in jobs]
        batch = post("/v1/batches?webhook=" + requests.utils.quote(f"http://localhost:{receiver.port}/batch-hook"),
                     data=json.dumps({"custom_id": f"{url}/custom-id", "model": model_id, "layer": "layer3",
                                      "request": edit, "params": small}),
                     headers={"Content-Type": "application/jsonl"})
        assert batch.status_code == 202, batch.text
        registered = post("/v1/models", files={"file": (f"{url}/file.safetensors",
                                                         (tmp_path / "gan.safetensors").read_bytes())},
                          data={"name": f"{url}/name", "config": json.dumps({"z_dim": 8, "resolution": 16,
                                                                            "channels": [8, 8, 8],
                                                                            "weights_url": f"{url}/w"})})
        assert registered.status_code == 202, registered.text
        stat = post("/v1/statistics", json={"model": model_id, "layer": "layer4", "samples": 16})
        assert stat.status_code in (200, 202), stat.text
        for path in (f"/v1/jobs?model={url}", f"/v1/statistics?layer={url}", f"/v1/jobs?cursor={url}"):
            requests.get(f"{server.url}{path}", headers=headers, timeout=30)

        ids = [job.json()["id"] for job in jobs]
        finals = [api.wait(job_id, timeout=300) for job_id in ids]
        assert [final["status"] for final in finals] == ["succeeded", "succeeded"], finals  # (source_class: unused
        # without a segmenter; it is only ever compared with the segmenter's class names)
        # the job's webhook and the batch's, delivered to the allow-listed host only, signed
        wait_until(lambda: len(receiver.hits) >= 2, 120, what="webhooks delivered")
        inspected = wait_until(lambda: (m := api.request("GET", f"/v1/models/{registered.json()['id']}").json())
                               ["status"] != "pending" and m, 120)
        assert inspected["status"] == "failed" and "weights_url" in inspected["error"]  # a config key, not a URL
        time.sleep(2)  # a late request would still be recorded
        paths = sorted(hit[1] for hit in receiver.hits)
        assert paths == ["/batch-hook", "/hook"], paths
        for method, _, hit_headers, body in receiver.hits:
            assert method == "POST"
            verify(SECRET, hit_headers[SIGNATURE_HEADER], body)
        assert trap.hits == [], [hit[:2] for hit in trap.hits]
    finally:
        stack.stop_all()
