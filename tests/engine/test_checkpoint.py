import json

import pytest
import torch

from rewriting.checkpoint import (ARCHITECTURES, file_sha256, load_model, load_state, model_class,
                                  save_model)
from rewriting.errors import CheckpointError
from tests.engine.tiny_models import build

TINY = {"tiny-equalized": "tests.engine.tiny_models:EqualizedGAN",
        "tiny-stylegan2": "tests.engine.tiny_models:StyleGAN2Like"}


@pytest.mark.parametrize("arch, name", [("tiny-equalized", "equalized"), ("tiny-stylegan2", "stylegan2")])
def test_save_and_load_round_trip(tmp_path, arch, name):
    model = build(name, z_dim=12)
    path = tmp_path / "g.safetensors"
    save_model(model, path, arch, {"z_dim": 12})
    back = load_model(path, architectures=TINY)
    assert type(back) is type(model) and back.z_dim == 12 and not back.training
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    z = torch.randn(2, 12)
    assert torch.equal(back(z), model(z))
    _, meta = load_state(path)
    assert meta["architecture"] == arch and json.loads(meta["config"]) == {"z_dim": 12}
    assert not path.read_bytes().startswith(b"\x80")  # not a pickle


def test_sha256_is_of_the_file_bytes(tmp_path):
    import hashlib
    path = tmp_path / "x"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_unknown_architecture_is_refused(tmp_path):
    path = tmp_path / "g.safetensors"
    save_model(build("equalized"), path, "os:system", {})
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_model(path, architectures=TINY)
    assert set(ARCHITECTURES) == {"demo-gan", "demo-segmenter"}
    with pytest.raises(CheckpointError):
        model_class("nope")


def test_mismatched_weights_and_garbage(tmp_path):
    path = tmp_path / "g.safetensors"
    save_model(build("equalized"), path, "tiny-equalized", {"channels": 4})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path, architectures=TINY)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError):
        load_model(bad, architectures=TINY)


def test_load_to_device(tmp_path, device):
    path = tmp_path / "g.safetensors"
    save_model(build("equalized"), path, "tiny-equalized", {})
    model = load_model(path, device=device, architectures=TINY)
    assert next(model.parameters()).device.type == device.type
