"""Shared pieces of the worker tests: a tiny generator checkpoint, a tiny segmenter, a
world (database, store, settings) to run task bodies in, and jobs to run.

The tiny generator is a real ``demo-gan`` (16x16 images, 8 channels, z_dim 8; layers
layer1..layer6, layer3 and layer4 at 8x8), so jobs go through the same code as the demo.
Each test draws its own weights (a fresh sha256) and its own tenant: the PostgreSQL
database is shared by the session, the store is not, so nothing may be found by content
from another test.

Import the fixtures into a test module to use them (``from job_fixtures import world``).
"""
import hashlib
import os
import secrets
from dataclasses import dataclass

import pytest
import torch

from palimpsest.config import load_settings
from rewriting.checkpoint import save_model
from storage import lifecycle
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Tenant
from storage.objects import LocalStore

GENERATOR_CONFIG = {"z_dim": 8, "resolution": 16, "channels": [8, 8, 8]}
SEGMENTER_CONFIG = {"channels": [4, 4, 4]}
LAYER = "layer3"
STAT_LAYER = "layer3.conv"  # the statistic row of jobs on LAYER: its weight module (storage.statistics.keys_layer)
SAMPLES = 64  # images in the tiny statistics: seeds 100000..100063


def save_generator(path, seed=None):
    from demo.generator import Generator

    torch.manual_seed(secrets.randbelow(2**31) if seed is None else seed)
    model = Generator(**GENERATOR_CONFIG).eval()
    save_model(model, path, "demo-gan", GENERATOR_CONFIG)
    return path


def save_segmenter(path, seed=0):
    from demo.segmenter import Segmenter

    torch.manual_seed(seed)
    model = Segmenter(**SEGMENTER_CONFIG).eval()
    save_model(model, path, "demo-segmenter", SEGMENTER_CONFIG)
    return path


def copy_request():
    """Copy the top-left quarter of seed 1 into the bottom-right of seed 2."""
    return {
        "operation": "copy",
        "copy": {"seed": 1, "mask": [0.0, 0.0, 0.5, 0.5]},
        "paste": {"seed": 2, "mask": [0.5, 0.5, 1.0, 1.0]},
        "context": [{"seed": 2, "mask": [0.5, 0.5, 1.0, 1.0]}, {"seed": 3, "mask": [0.25, 0.25, 0.75, 0.75]}],
    }


def fast_params(**overrides):
    return {"steps": 20, "samples": SAMPLES, "held_out": 2, **overrides}


@dataclass
class World:
    """What a worker runs against: the database, the store and the settings."""

    session_factory: object
    store: object
    settings: object
    tmp_path: object

    def tenant(self, name="acme") -> str:
        """A new tenant: ``name`` and a random suffix (names are unique, databases shared)."""
        with session_scope(self.session_factory) as session:
            tenant = Tenant(name=f"{name}-{secrets.token_hex(4)}")
            session.add(tenant)
            session.flush()
            return tenant.id

    def job(self, tenant_id, model_id, layer=LAYER, request=None, params=None, **columns) -> str:
        with session_scope(self.session_factory) as session:
            job = lifecycle.create_job(session, tenant_id=tenant_id, model_id=model_id, layer=layer,
                                       request=request or copy_request(),
                                       params=fast_params() if params is None else params, **columns)
            return job.id

    def read(self, key) -> bytes:
        with self.store.open(key) as f:
            return f.read()

    def keys_under(self, prefix) -> list:
        """Object keys under ``prefix`` (a LocalStore's files)."""
        root = self.store.root
        return sorted(str(p.relative_to(root)) for p in (root / prefix).rglob("*")
                      if p.is_file() and not p.name.startswith("."))


def make_world(database_url, store, tmp_path, **settings) -> World:
    """Workers run on the CPU unless ``PALIMPSEST_DEVICE`` asks for another device (cuda, auto)."""
    env = {"PALIMPSEST_DATA_DIR": str(tmp_path / "var"), "PALIMPSEST_DATABASE_URL": database_url,
           "PALIMPSEST_DEVICE": os.environ.get("PALIMPSEST_DEVICE", "cpu")}
    return World(make_session_factory(make_engine(database_url)), store,
                 load_settings(env, **settings), tmp_path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request):
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def world(database_url, tmp_path):
    return make_world(database_url, LocalStore(tmp_path / "objects"), tmp_path)


@dataclass
class Registered:
    tenant_id: str
    model_id: str
    path: object  # the generator checkpoint on disk


@pytest.fixture
def tiny_model(world, tmp_path) -> Registered:
    """A tiny generator with a tiny segmenter, registered for a fresh tenant."""
    from workers.models import register_model_file

    tenant_id = world.tenant()
    path = save_generator(tmp_path / "generator.safetensors")
    model_id = register_model_file(world.session_factory, world.store, path, tenant_id=tenant_id, name="tiny",
                                   segmenter_path=save_segmenter(tmp_path / "segmenter.safetensors"))
    return Registered(tenant_id, model_id, path)
