"""Fixtures and helpers for the /v1 resource tests: an app on a migrated SQLite database,
the embedded SQL broker and a file store, all in ``tmp_path``; tenants with keys; rows
made directly (models, jobs in any state, artifacts), and the messages the API queued.

Test modules import what they use: ``from v1_helpers import app, client, ...``
(the ``app`` fixture here replaces tests/api/conftest.py's, whose database is not migrated).
"""
import base64
import hashlib
import io
import json
import struct

import pytest
from sqlalchemy import create_engine, text

from api import create_app
from api.auth import create_key
from stack import embedded_stack
from storage import lifecycle
from storage.db import session_scope
from storage.models import Artifact, Model, Statistic, new_id

LAYERS = [
    {"name": "layer3", "kind": "conv", "param": "layer3.conv.weight", "key_channels": 32, "key_size": [8, 8],
     "value_channels": 32, "value_size": [8, 8]},
    {"name": "layer4", "kind": "conv", "param": "layer4.conv.weight", "key_channels": 4, "key_size": [16, 16],
     "value_channels": 16, "value_size": [16, 16]},
    {"name": "fc", "kind": "linear", "param": "fc.weight", "key_channels": 8, "key_size": None,
     "value_channels": 8, "value_size": None},
]
EDIT = {"operation": "copy", "copy": {"seed": 1, "mask": [0.1, 0.1, 0.5, 0.5]},
        "paste": {"seed": 2, "mask": [0.5, 0.5, 0.9, 0.9]}}


@pytest.fixture
def config(tmp_path, sqlite_url):
    return {**embedded_stack(tmp_path).settings.as_flask_config(), "TESTING": True,
            "PALIMPSEST_DATABASE_URL": sqlite_url,
            # webhooks in test bodies point here; nothing is sent from these unit tests
            "PALIMPSEST_WEBHOOK_ALLOWED_HOSTS": ("example.com",), "PALIMPSEST_WEBHOOK_SECRET": "s"}


@pytest.fixture
def app(config):
    return create_app(config)


@pytest.fixture
def client(app):
    return app.test_client()


class Tenant:
    def __init__(self, app, name):
        self.name = name
        with session_scope(app.extensions["palimpsest_db"].session_factory) as session:
            self.key, row = create_key(session, name)
            self.id = row.tenant_id
        self.headers = {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def alice(app):
    return Tenant(app, "alice")


@pytest.fixture
def bob(app):
    return Tenant(app, "bob")


def sessions(app):
    return session_scope(app.extensions["palimpsest_db"].session_factory)


def add_model(app, tenant_id: str | None, *, status="ready", layers=LAYERS, sha256=None, name="tiny") -> str:
    sha256 = sha256 or hashlib.sha256(new_id("x").encode()).hexdigest()
    with sessions(app) as session:
        model = Model(tenant_id=tenant_id, name=name, architecture="demo-gan", config={}, sha256=sha256, size=10,
                      object_key=f"shared/models/{sha256}/model.safetensors", layers=layers, status=status,
                      error="bad weights" if status == "failed" else None)
        session.add(model)
        session.flush()
        return model.id


def add_job(app, tenant_id: str, model_id: str, status="queued", **columns) -> str:
    """A job row moved to ``status`` through storage.lifecycle, as a worker would."""
    with sessions(app) as session:
        job = lifecycle.create_job(session, tenant_id=tenant_id, model_id=model_id, layer="layer3",
                                   request=EDIT, params={}, **columns)
        job_id = job.id
    if status == "queued":
        return job_id
    with sessions(app) as session:
        if status == "cancelled":
            lifecycle.request_cancel(session, job_id)
            return job_id
        lease = lifecycle.claim(session, job_id, "test-worker", ttl=60)
        if status != "running":
            lifecycle.finish(session, lease, status, **({"error_code": "boom", "error_message": "it broke"}
                                                          if status == "failed" else {}))
    return job_id


def add_artifact(app, job_id: str, name: str, data: bytes, content_type="application/octet-stream") -> str:
    """An artifact object in the app's store and its row (as the worker records them)."""
    sha256 = hashlib.sha256(data).hexdigest()
    key = f"artifacts/{sha256}/{name}.bin"
    app.extensions["palimpsest_store"].put(key, io.BytesIO(data))
    with sessions(app) as session:
        session.add(Artifact(job_id=job_id, name=name, object_key=key, sha256=sha256, size=len(data),
                             content_type=content_type))
    return sha256


def add_statistic(app, sha256: str, layer="layer3", spec="seeds:100000-100100", status="ready") -> str:
    with sessions(app) as session:
        stat = Statistic(model_sha256=sha256, layer=layer, sample_spec=spec, status=status)
        session.add(stat)
        session.flush()
        return stat.id


def model_sha256(app, model_id: str) -> str:
    with sessions(app) as session:
        return session.get(Model, model_id).sha256


def queued(app) -> list[tuple[str, str, list, int | None]]:
    """Messages waiting in the embedded broker: (queue, task name, args, priority), oldest first."""
    url = app.config["PALIMPSEST_BROKER_URL"].removeprefix("sqla+")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            if not engine.dialect.has_table(connection, "kombu_message"):
                return []
            rows = connection.execute(text(
                "SELECT q.name, m.payload FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id "
                "WHERE m.visible ORDER BY m.id")).all()
    finally:
        engine.dispose()
    out = []
    for queue, payload in rows:
        message = json.loads(payload)
        body = json.loads(base64.b64decode(message["body"]))
        out.append((queue, message["headers"]["task"], body[0], message["properties"].get("priority")))
    return out


def safetensors_bytes(tensors: dict | None = None, metadata: dict | None = None) -> bytes:
    """A valid safetensors file built by hand: ``tensors`` maps name -> (dtype, shape, bytes)."""
    tensors = tensors if tensors is not None else {"w": ("F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4))}
    header, data, offset = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data
