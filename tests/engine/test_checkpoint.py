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


def test_the_same_content_is_written_as_the_same_bytes(tmp_path):
    # safetensors writes metadata in hash order; a file's sha256 must name its content
    from rewriting.checkpoint import safetensors_bytes, write_safetensors
    from rewriting.delta import EditDelta
    from rewriting.statistics import compute_second_moment
    from safetensors.torch import load

    model = build("equalized", z_dim=12)
    metadata = {f"key{i}": "é" * i for i in range(12)}
    files, stats = [], []
    for i in range(6):
        files.append(tmp_path / f"g{i}.safetensors")
        save_model(model, files[-1], "tiny-equalized", {"z_dim": 12}, metadata=metadata)
        stats.append(tmp_path / f"s{i}.safetensors")
        compute_second_moment(model, "layer2", "0-3", model_sha256="ab" * 32).save(stats[-1], metadata=metadata)
    assert len({file_sha256(p) for p in files}) == 1 and len({file_sha256(p) for p in stats}) == 1
    delta = EditDelta(layer="layer2.conv", param="weight", base_sha256="ab" * 32, lam=torch.randn(4, 1, 3, 3),
                      directions=torch.randn(1, 6), in_dim=1, config={"b": 1, "a": [2]})
    assert len({delta.to_bytes() for _ in range(6)}) == 1
    data = safetensors_bytes({"x": torch.arange(5.0)}, metadata)
    assert int.from_bytes(data[:8], "little") % 8 == 0 and torch.equal(load(data)["x"], torch.arange(5.0))
    write_safetensors({"x": torch.arange(5.0)}, tmp_path / "x.safetensors", metadata)
    assert (tmp_path / "x.safetensors").read_bytes() == data
    back, meta = load_state(files[0])
    assert meta["key3"] == "ééé" and torch.equal(back["layer2.conv.weight"], model.state_dict()["layer2.conv.weight"])


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
