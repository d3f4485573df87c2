"""GET /v1/jobs/{id}/artifacts/{name}: the file store streams the file (right bytes,
Content-Length, ETag = sha256); S3 redirects to a presigned URL that expires."""
import hashlib
import os
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from api import create_app
from v1_helpers import add_artifact, add_job, add_model, alice, app, bob, client, config  # noqa: F401

DATA = os.urandom(3 * 1024 * 1024 + 17)  # several store chunks and a ragged end


@pytest.fixture
def job(app, alice):
    job_id = add_job(app, alice.id, add_model(app, None), "succeeded")
    add_artifact(app, job_id, "checkpoint", DATA)
    add_artifact(app, job_id, "metrics", b'{"success": 0.9}', content_type="application/json")
    return job_id


def test_file_store_streams_the_artifact(client, alice, job):
    response = client.get(f"/v1/jobs/{job}/artifacts/checkpoint", headers=alice.headers)
    assert response.status_code == 200
    assert response.is_streamed  # a generator over the file, not a body built in memory
    body = response.get_data()
    assert body == DATA
    assert response.headers["Content-Length"] == str(len(DATA))
    assert response.headers["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert response.headers["Content-Disposition"] == 'attachment; filename="checkpoint.bin"'
    assert response.mimetype == "application/octet-stream"


def test_artifacts_listed_on_the_job_with_download_urls(client, alice, job):
    listed = {a["name"]: a for a in client.get(f"/v1/jobs/{job}", headers=alice.headers).json["artifacts"]}
    assert list(listed) == ["checkpoint", "metrics"]  # in ARTIFACT_NAMES order
    assert listed["checkpoint"]["sha256"] == hashlib.sha256(DATA).hexdigest()
    assert listed["checkpoint"]["size"] == len(DATA)
    assert listed["metrics"]["content_type"] == "application/json"
    url = listed["metrics"]["url"]
    assert url == f"http://localhost/v1/jobs/{job}/artifacts/metrics"
    assert client.get(url, headers=alice.headers).get_data() == b'{"success": 0.9}'


@pytest.mark.parametrize("form", ['"{}"', 'W/"{}"', '"other", "{}"', "*"])  # If-None-Match compares weakly
def test_if_none_match_is_304(client, alice, job, form):
    etag = form.format(hashlib.sha256(DATA).hexdigest())
    response = client.get(f"/v1/jobs/{job}/artifacts/checkpoint", headers={**alice.headers, "If-None-Match": etag})
    assert response.status_code == 304
    assert response.get_data() == b""


@pytest.mark.parametrize("name", ["preview", "delta", "weights", ".."])
def test_missing_artifact_is_404(client, alice, job, name):
    response = client.get(f"/v1/jobs/{job}/artifacts/{name}", headers=alice.headers)
    assert response.status_code == 404
    assert response.json["error"]["code"] in ("artifact_not_found", "not_found")


def test_other_tenant_gets_404(client, bob, job):
    response = client.get(f"/v1/jobs/{job}/artifacts/checkpoint", headers=bob.headers)
    assert response.status_code == 404
    assert response.json["error"]["code"] == "job_not_found"


def test_s3_redirects_to_a_presigned_url(config, s3_server, s3_storage_url, alice_on_s3):
    app, tenant = alice_on_s3
    job_id = add_job(app, tenant.id, add_model(app, None), "succeeded")
    add_artifact(app, job_id, "checkpoint", DATA)
    response = app.test_client().get(f"/v1/jobs/{job_id}/artifacts/checkpoint", headers=tenant.headers)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(s3_server)
    assert parse_qs(urlsplit(location).query)["X-Amz-Expires"] == ["300"]
    download = requests.get(location, timeout=30)
    assert download.status_code == 200
    assert download.content == DATA


def test_presign_lifetime_is_configurable(config, s3_server, s3_storage_url, alice_on_s3):
    app, tenant = alice_on_s3
    app.config["PALIMPSEST_PRESIGN_SECONDS"] = 60
    job_id = add_job(app, tenant.id, add_model(app, None), "succeeded")
    add_artifact(app, job_id, "delta", b"delta bytes")
    location = app.test_client().get(f"/v1/jobs/{job_id}/artifacts/delta", headers=tenant.headers).headers["Location"]
    assert parse_qs(urlsplit(location).query)["X-Amz-Expires"] == ["60"]


@pytest.fixture
def alice_on_s3(config, s3_server, s3_storage_url):
    from v1_helpers import Tenant

    app = create_app({**config, "PALIMPSEST_STORAGE_URL": s3_storage_url, "PALIMPSEST_S3_ENDPOINT_URL": s3_server})
    return app, Tenant(app, "alice")
