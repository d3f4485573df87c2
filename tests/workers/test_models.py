"""inspect_model's body and register_model_file: a checkpoint is used only once it is
safetensors, of a known architecture, loads strictly, and holds finite weights."""
import io
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import select

from job_fixtures import GENERATOR_CONFIG, database_url, save_generator, save_segmenter, world  # noqa: F401
from storage.db import session_scope
from storage.models import Model
from storage.objects import content_key
from workers.artifacts import file_sha256, put_file
from workers.models import ModelRefused, inspect_file, process_model, register_demo, register_model_file

LAYER_FIELDS = {"name", "kind", "param", "key_channels", "key_size", "value_channels", "value_size"}


class Tripwire:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def upload(world, path, tenant_id, architecture="", config=None) -> str:
    """What the API does with an upload: store the bytes, insert a pending model."""
    stored = put_file(world.session_factory, world.store, path, tenant_id, "models", "model.safetensors")
    with session_scope(world.session_factory) as session:
        model = Model(tenant_id=tenant_id, name=path.name, architecture=architecture, config=config or {},
                      sha256=stored.sha256, size=stored.size, object_key=stored.key)
        session.add(model)
        session.flush()
        assert model.status == "pending"
        return model.id


def inspected(world, model_id) -> Model:
    process_model(world.session_factory, world.store, world.settings, model_id)
    with session_scope(world.session_factory) as session:
        return session.get(Model, model_id)


def test_inspect_model_lists_the_editable_layers(world, tmp_path):
    tenant = world.tenant()
    model = inspected(world, upload(world, save_generator(tmp_path / "g.safetensors"), tenant))
    assert (model.status, model.error, model.architecture, model.config) == ("ready", None, "demo-gan",
                                                                              GENERATOR_CONFIG)
    layers = {layer["name"]: layer for layer in model.layers}
    assert all(set(layer) == LAYER_FIELDS for layer in model.layers)
    assert layers["layer3"] == {"name": "layer3", "kind": "equalized_conv2d", "param": "layer3.conv.weight",
                                "key_channels": 8, "key_size": [8, 8], "value_channels": 8, "value_size": [8, 8]}
    assert layers["fc"]["key_size"] is None


def test_a_second_inspection_does_nothing(world, tmp_path):
    model_id = upload(world, save_generator(tmp_path / "g.safetensors"), world.tenant())
    assert process_model(world.session_factory, world.store, world.settings, model_id) == "ready"
    with session_scope(world.session_factory) as session:
        session.get(Model, model_id).layers = []  # a rerun would refill this
    assert process_model(world.session_factory, world.store, world.settings, model_id) == "ready"
    with session_scope(world.session_factory) as session:
        assert session.get(Model, model_id).layers == []
    assert process_model(world.session_factory, world.store, world.settings, "mdl_missing") is None


def nan_checkpoint(path):
    from demo.generator import Generator

    model = Generator(**GENERATOR_CONFIG)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layer2.conv.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(path), metadata={"architecture": "demo-gan", "config": json.dumps(GENERATOR_CONFIG)})
    return path


def unknown_architecture(path):
    save_file({"w": torch.zeros(2)}, str(path), metadata={"architecture": "stylegan9", "config": "{}"})
    return path


def wrong_config(path):
    save_generator(path)
    return path


def raw(data):
    def make(path):
        path.write_bytes(data)
        return path
    return make


REFUSED = [
    # (make the file, architecture given with the upload, config given, words the error must contain)
    (nan_checkpoint, "", None, "file: tensor 'layer2.conv.weight' holds NaN"),
    (unknown_architecture, "", None, "architecture: unknown architecture 'stylegan9'"),
    (wrong_config, "", {"z_dim": 8, "resolution": 16, "channels": [16, 16, 16]}, "file: the weights do not fit"),
    (wrong_config, "", {"z_dim": 8, "resolution": 15, "channels": [8, 8, 8]}, "config: demo-gan cannot be built"),
    (wrong_config, "", {"depth": 3}, "config: demo-gan cannot be built"),
    (wrong_config, "demo-segmenter", None, "architecture: 'demo-segmenter' was given, but the file says 'demo-gan'"),
    (lambda p: save_segmenter(p), "", None, "architecture: demo-segmenter is not a generator"),
    (raw(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"), "", None,
     "file: not a safetensors file (its header is not JSON)"),
    (raw(b"abc"), "", None, "file: too short"),
]


@pytest.mark.parametrize("make, architecture, config, error", REFUSED)
def test_inspect_model_refuses(world, tmp_path, make, architecture, config, error):
    model = inspected(world, upload(world, make(tmp_path / "bad.safetensors"), world.tenant(), architecture, config))
    assert model.status == "failed"
    assert model.error.startswith(error), model.error
    assert model.layers == []


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_renamed_safetensors_is_refused_without_unpickling(world, tmp_path, how):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.safetensors"
    if how == "pickle":
        path.write_bytes(pickle.dumps({"weight": Tripwire(marker)}))
    else:
        buffer = io.BytesIO()
        torch.save({"weight": Tripwire(marker)}, buffer)
        path.write_bytes(buffer.getvalue())
    model = inspected(world, upload(world, path, world.tenant(), "demo-gan"))
    assert model.status == "failed"
    assert model.error.startswith("file: not a safetensors file (a pickle or torch.save file is refused")
    assert not marker.exists()
    assert not list((world.tmp_path / "var" / "cache").glob(f"{model.sha256}*"))  # not kept in the cache


def test_inspect_model_refuses_bytes_that_do_not_match_the_recorded_hash(world, tmp_path):
    model_id = upload(world, save_generator(tmp_path / "g.safetensors"), world.tenant())
    with session_scope(world.session_factory) as session:
        session.get(Model, model_id).sha256 = "0" * 64
    model = inspected(world, model_id)
    assert model.status == "failed" and "hash" in model.error


def test_inspect_model_of_a_missing_upload(world):
    tenant = world.tenant()
    with session_scope(world.session_factory) as session:
        model = Model(tenant_id=tenant, name="gone", architecture="demo-gan", config={}, sha256="1" * 64, size=1,
                      object_key=content_key(tenant, "models", "1" * 64, "model.safetensors"))
        session.add(model)
        session.flush()
        model_id = model.id
    model = inspected(world, model_id)
    assert model.status == "failed" and "upload is missing" in model.error


def test_inspect_file_uses_the_given_architecture_and_config(tmp_path):
    """A file written by another tool, without metadata: the upload names its architecture."""
    from demo.generator import Generator

    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in Generator(**GENERATOR_CONFIG).state_dict().items()}, str(path))
    with pytest.raises(ModelRefused, match="architecture: not given"):
        inspect_file(path)
    found = inspect_file(path, "demo-gan", GENERATOR_CONFIG)
    assert found.architecture == "demo-gan" and found.layers


def test_register_model_file_is_idempotent_per_tenant(world, tmp_path):
    path = save_generator(tmp_path / "g.safetensors")
    segmenter = save_segmenter(tmp_path / "s.safetensors")
    tenant = world.tenant()
    first = register_model_file(world.session_factory, world.store, path, tenant_id=tenant, name="g",
                                segmenter_path=segmenter)
    again = register_model_file(world.session_factory, world.store, path, tenant_id=tenant, name="g again")
    other = register_model_file(world.session_factory, world.store, path, tenant_id=world.tenant("other"), name="g")
    assert first == again != other
    with session_scope(world.session_factory) as session:
        model = session.get(Model, first)
    sha = file_sha256(path)
    assert (model.status, model.sha256, model.size) == ("ready", sha, path.stat().st_size)
    assert model.object_key == f"tenants/{tenant}/models/{sha}/model.safetensors"
    assert model.segmenter_object_key == f"tenants/{tenant}/segmenters/{file_sha256(segmenter)}/segmenter.safetensors"
    assert model.segmenter_architecture == "demo-segmenter"
    with world.store.open(model.object_key) as f:
        assert f.read() == path.read_bytes()


def test_register_model_file_refuses_a_bad_checkpoint(world, tmp_path):
    with pytest.raises(ModelRefused, match="NaN"):
        register_model_file(world.session_factory, world.store, nan_checkpoint(tmp_path / "nan.safetensors"),
                            tenant_id=world.tenant(), name="nan")


def test_register_demo_shares_the_demo_generator(world):
    from demo.artifacts import GENERATOR_PATH, SEGMENTER_PATH

    if not GENERATOR_PATH.exists():
        with pytest.raises(FileNotFoundError, match="not been trained"):
            register_demo(world.session_factory, world.store)
        pytest.skip("demo/weights/generator.safetensors is not trained yet")
    model_id = register_demo(world.session_factory, world.store)
    assert register_demo(world.session_factory, world.store) == model_id
    with session_scope(world.session_factory) as session:
        model = session.get(Model, model_id)
        shared = session.scalars(select(Model).where(Model.tenant_id.is_(None), Model.name == "demo")).all()
    assert model.tenant_id is None and model.name == "demo" and model.status == "ready"
    assert model.object_key.startswith("shared/models/") and model in shared
    assert (model.segmenter_object_key is not None) == SEGMENTER_PATH.exists()
