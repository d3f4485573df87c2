"""POST/GET /v1/models: safetensors uploads streamed to the store, refused up front when
the file is anything else (never unpickled), registration of stored objects, listing."""
import hashlib
import io
import json
import os
import pickle
import struct
import tracemalloc
import zipfile

import pytest

from storage.models import Model
from v1_helpers import (  # noqa: F401
    add_model, alice, app, bob, client, config, queued, safetensors_bytes, sessions,
)

META = {"architecture": "demo-gan", "config": json.dumps({"z_dim": 8}), "format": "palimpsest.model/1"}


def upload(client, tenant, data: bytes, filename="model.safetensors", **fields):
    form = {**fields, "file": (io.BytesIO(data), filename)}
    return client.post("/v1/models", data=form, content_type="multipart/form-data", headers=tenant.headers)


def stored_keys(app, tenant) -> list[str]:
    root = app.extensions["palimpsest_store"].root / "tenants" / tenant.id
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_upload_streams_to_the_store_and_queues_inspection(app, client, alice):
    data = safetensors_bytes(metadata=META)
    response = upload(client, alice, data, name="my gan")
    assert response.status_code == 202, response.json
    model = response.json
    assert response.headers["Location"] == f"/v1/models/{model['id']}"
    assert model["status"] == "pending" and model["layers"] == [] and model["error"] is None
    assert model["sha256"] == hashlib.sha256(data).hexdigest() and model["size"] == len(data)
    assert model["architecture"] == "demo-gan" and model["config"] == {"z_dim": 8}  # from the file's metadata
    assert model["name"] == "my gan" and model["shared"] is False
    with sessions(app) as session:
        key = session.get(Model, model["id"]).object_key
    assert key == f"tenants/{alice.id}/models/{model['id']}/model.safetensors"
    assert app.extensions["palimpsest_store"].open(key).read() == data
    assert queued(app) == [("cpu", "workers.models.inspect_model", [model["id"]], 0)]


def test_form_fields_override_the_metadata_and_may_follow_the_file(client, alice):
    data = safetensors_bytes()  # no metadata at all
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="weights.safetensors"\r\n\r\n' + data
            + b'\r\n--b\r\nContent-Disposition: form-data; name="architecture"\r\n\r\ndemo-gan'
            + b'\r\n--b\r\nContent-Disposition: form-data; name="config"\r\n\r\n{"z_dim": 16}\r\n--b--\r\n')
    response = client.post("/v1/models", data=body, content_type="multipart/form-data; boundary=b",
                           headers=alice.headers)
    assert response.status_code == 202, response.json
    assert response.json["architecture"] == "demo-gan" and response.json["config"] == {"z_dim": 16}
    assert response.json["name"] == "weights.safetensors"


class CreatesFile:
    """Unpickling this creates ``path``: proof that something unpickled the upload."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_is_refused_without_being_unpickled(app, client, alice, tmp_path, protocol):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"state_dict": CreatesFile(str(marker))}, protocol=protocol)
    pickle.loads(pickle.dumps(CreatesFile(str(tmp_path / "probe"))))  # the payload does work when unpickled
    assert (tmp_path / "probe").exists()
    response = upload(client, alice, payload, filename="model.safetensors", architecture="demo-gan")
    assert response.status_code == 422
    assert response.json["error"] == {"code": "invalid_checkpoint", "field": "file",
                                      "message": response.json["error"]["message"]}
    assert "pickle" in response.json["error"]["message"]
    assert not marker.exists()
    assert stored_keys(app, alice) == []
    assert queued(app) == []


def torch_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:  # torch.save's format: a zip holding data.pkl
        archive.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
    return out.getvalue()


def header_only(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD = safetensors_bytes()

REFUSED = [
    ("torch-zip", torch_zip()),
    ("empty", b""),
    ("short", b"\x10\x00"),
    ("huge-header-length", struct.pack("<Q", 1 << 40) + b"{}"),
    ("header-past-end", struct.pack("<Q", 100) + b'{"a": 1}'),
    ("header-not-json", struct.pack("<Q", 8) + b"{nope!!}"),
    ("header-a-list", struct.pack("<Q", 6) + b"[1, 2]"),
    ("entry-without-offsets", header_only({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4)),
    ("offsets-do-not-match-shape", header_only({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                                               b"\0" * 4)),
    ("metadata-not-strings", header_only({"__metadata__": {"a": 1}})),
    ("truncated", GOOD[:-3]),
    ("padded", GOOD + b"extra"),
]


@pytest.mark.parametrize("data", [case[1] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_non_safetensors_files_are_refused(app, client, alice, data):
    response = upload(client, alice, data, architecture="demo-gan")
    assert response.status_code == 422, response.json
    assert response.json["error"]["code"] == "invalid_checkpoint"
    assert response.json["error"]["field"] == "file"
    assert stored_keys(app, alice) == []  # refused up front, or removed when the end did not match
    assert queued(app) == []


@pytest.mark.parametrize("fields, field", [
    ({}, "architecture"),  # neither the form nor the file's metadata names one
    ({"architecture": "../etc"}, "architecture"),
    ({"architecture": "demo-gan", "config": "[1]"}, "config"),
    ({"architecture": "demo-gan", "config": "{oops"}, "config"),
    ({"architecture": "demo-gan", "colour": "red"}, "colour"),
    ({"architecture": "demo-gan", "name": "n" * 201}, "name"),
])
def test_bad_fields_are_422_and_leave_nothing_stored(app, client, alice, fields, field):
    response = upload(client, alice, safetensors_bytes(), **fields)
    assert response.status_code == 422, response.json
    assert response.json["error"]["field"] == field
    assert stored_keys(app, alice) == []


def test_missing_file_part_is_422(client, alice):
    response = client.post("/v1/models", data={"architecture": "demo-gan"}, content_type="multipart/form-data",
                           headers=alice.headers)
    assert response.status_code == 422
    assert response.json["error"]["field"] == "file"


def test_wrong_content_type_is_400(client, alice):
    response = client.post("/v1/models", data=b"raw", content_type="application/octet-stream", headers=alice.headers)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "bad_request"


def test_truncated_multipart_body_is_400(client, alice):
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="m"\r\n\r\n' + GOOD[:20]
    response = client.post("/v1/models", data=body, content_type="multipart/form-data; boundary=b",
                           headers=alice.headers)
    assert response.status_code == 400


def test_upload_over_the_limit_is_413(app, client, alice):
    app.config["PALIMPSEST_MAX_UPLOAD_BYTES"] = 4096
    big = safetensors_bytes({"w": ("U8", [8192], b"\1" * 8192)})
    response = upload(client, alice, big, architecture="demo-gan")
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"
    assert stored_keys(app, alice) == []
    assert upload(client, alice, safetensors_bytes(), architecture="demo-gan").status_code == 202


def test_upload_over_the_limit_without_content_length_is_413(app, alice):
    """A chunked body (no Content-Length) is cut off at the limit while it streams."""
    app.config["PALIMPSEST_MAX_UPLOAD_BYTES"] = 1 << 20
    big = safetensors_bytes({"w": ("U8", [4 << 20], b"\1" * (4 << 20))})
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="m"\r\n\r\n' + big + b"\r\n--b--\r\n")
    response = app.test_client().post(
        "/v1/models", input_stream=io.BytesIO(body), content_type="multipart/form-data; boundary=b",
        headers={**alice.headers, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True})
    assert response.status_code == 413
    assert stored_keys(app, alice) == []


def test_upload_memory_stays_bounded(client, alice):
    """A 64 MiB upload through the test client: the view's Python allocations peak at a
    few chunks, not the file (bench: tests/api/test_models_memory.py, 1 GB under gunicorn)."""
    size = 64 * 1024 * 1024
    data = safetensors_bytes({"w": ("U8", [size], os.urandom(1024) * (size // 1024))})
    form = {"architecture": "demo-gan", "file": (io.BytesIO(data), "big.safetensors")}
    from werkzeug.test import EnvironBuilder

    builder = EnvironBuilder(path="/v1/models", method="POST", data=form, headers=alice.headers)
    environ = builder.get_environ()  # the multipart body, spooled to a temporary file
    total = len(data)
    del data, form
    tracemalloc.start()
    try:
        response = client.open(environ)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        builder.close()
    assert response.status_code == 202, response.json
    assert response.json["size"] == total
    print(f"upload of {total / 2**20:.0f} MiB: peak Python allocations {peak / 2**20:.1f} MiB")
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB of Python allocations for a 64 MiB upload"


# -- registering an object already in the store -----------------------------------------------

def put(app, key, data):
    app.extensions["palimpsest_store"].put(key, io.BytesIO(data))


def test_register_a_stored_object(app, client, alice):
    data = safetensors_bytes(metadata=META)
    key = f"tenants/{alice.id}/incoming/gan.safetensors"
    put(app, key, data)
    response = client.post("/v1/models", json={"object_key": key, "name": "registered"}, headers=alice.headers)
    assert response.status_code == 202, response.json
    assert response.json["sha256"] == hashlib.sha256(data).hexdigest() and response.json["size"] == len(data)
    assert response.json["status"] == "pending" and response.json["architecture"] == "demo-gan"
    assert queued(app) == [("cpu", "workers.models.inspect_model", [response.json["id"]], 0)]


@pytest.mark.parametrize("key", [
    "shared/models/x/model.safetensors",
    "tenants/{other}/incoming/gan.safetensors",
    "tenants/{me}/../{other}/incoming/gan.safetensors",
    "tenants/{me}",
    "/tenants/{me}/x",
    7,
])
def test_register_refuses_keys_outside_the_tenant(app, client, alice, bob, key):
    data = safetensors_bytes(metadata=META)
    put(app, f"tenants/{bob.id}/incoming/gan.safetensors", data)
    if isinstance(key, str):
        key = key.format(me=alice.id, other=bob.id)
    response = client.post("/v1/models", json={"object_key": key}, headers=alice.headers)
    assert response.status_code == 422
    assert response.json["error"]["field"] == "object_key"


def test_register_missing_or_non_safetensors_object(app, client, alice):
    missing = client.post("/v1/models", json={"object_key": f"tenants/{alice.id}/nothing"}, headers=alice.headers)
    assert missing.status_code == 422 and missing.json["error"]["field"] == "object_key"
    put(app, f"tenants/{alice.id}/pickle.pt", pickle.dumps({"w": 1}))
    refused = client.post("/v1/models", json={"object_key": f"tenants/{alice.id}/pickle.pt",
                                              "architecture": "demo-gan"}, headers=alice.headers)
    assert refused.status_code == 422 and refused.json["error"]["code"] == "invalid_checkpoint"
    unknown = client.post("/v1/models", json={"object_key": f"tenants/{alice.id}/x", "colour": 1},
                          headers=alice.headers)
    assert unknown.status_code == 422 and unknown.json["error"]["field"] == "colour"


# -- reading -------------------------------------------------------------------------------------

def test_list_and_show(app, client, alice, bob):
    shared = add_model(app, None, name="demo")
    mine = add_model(app, alice.id, name="mine")
    theirs = add_model(app, bob.id, name="theirs")
    listed = client.get("/v1/models", headers=alice.headers).json["models"]
    assert {m["id"] for m in listed} == {shared, mine}
    by_id = {m["id"]: m for m in listed}
    assert by_id[shared]["shared"] is True and by_id[mine]["shared"] is False
    shown = client.get(f"/v1/models/{mine}", headers=alice.headers).json
    assert shown == by_id[mine]
    assert shown["layers"][0] == {"name": "layer3", "kind": "conv", "param": "layer3.conv.weight",
                                  "key_channels": 32, "key_size": [8, 8], "value_channels": 32, "value_size": [8, 8]}
    assert set(shown) == {"id", "name", "architecture", "config", "sha256", "size", "status", "error", "shared",
                          "layers", "created_at"}
    hidden = client.get(f"/v1/models/{theirs}", headers=alice.headers)
    assert hidden.status_code == 404 and hidden.json["error"]["code"] == "model_not_found"


def test_store_unavailable_is_503(app, client, alice, tmp_path):
    from storage.objects import LocalStore

    (tmp_path / "plain-file").write_text("not a directory")
    app.extensions["palimpsest_store"] = LocalStore(tmp_path / "plain-file" / "objects")
    response = upload(client, alice, safetensors_bytes(), architecture="demo-gan")
    assert response.status_code == 503
    assert response.json["error"]["code"] == "service_unavailable"
    assert queued(app) == []
