"""The shipped demo weights, records and bundled requests."""
import json

import pytest
import torch

from demo.artifacts import GENERATOR_PATH, REQUESTS_DIR, SEGMENTER_PATH, WEIGHTS_DIR
from demo.examples import EDITS, load_eval_requests
from demo.examples import main as examples_main
from demo.scenes import render_scenes
from demo.segmenter import confusion, iou_from_confusion
from rewriting.checkpoint import load_model
from rewriting.layers import editable_layers
from rewriting.requests import parse_request
from rewriting.seeds import latents


@pytest.fixture(scope="module")
def generator():
    return load_model(GENERATOR_PATH)


@pytest.fixture(scope="module")
def segmenter():
    return load_model(SEGMENTER_PATH)


def test_files_are_small_safetensors_with_records():
    for name in ("generator", "segmenter"):
        path = WEIGHTS_DIR / f"{name}.safetensors"
        assert path.stat().st_size <= 20 * 1024 * 1024
        record = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
        for field in ("config", "iterations", "seconds", "device", "final"):
            assert field in record, f"{name}.json lacks {field}"


def test_generator_makes_64x64_images_and_has_the_agreed_layers(generator):
    with torch.no_grad():
        images = generator(latents([0, 1], generator.z_dim))
    assert generator.z_dim == 128
    assert images.shape == (2, 3, 64, 64) and images.abs().max() <= 1
    # Distinct latents, distinct images; the same latent, the same image (up to float32
    # rounding that depends on the batch: the CPU's convolution kernels differ for batches
    # of 1 and 2, by 2.3e-5 on one of this machine's hosts, under 1e-5 on another).
    assert (images[0] - images[1]).abs().mean() > 0.01
    with torch.no_grad():
        assert torch.allclose(generator(latents([1], generator.z_dim))[0], images[1], atol=1e-4)
    sizes = {info.name: info.key_size for info in editable_layers(generator)}
    assert sizes["layer4"] == (8, 8) and sizes["layer6"] == (16, 16)
    assert generator.layer4.conv.weight_gain == pytest.approx(2 ** 0.5 / (256 * 9) ** 0.5)


def test_segmenter_labels_held_out_scenes(segmenter):
    images, labels = render_scenes(range(40), 64)  # seeds 0-999 are never trained on
    with torch.no_grad():
        iou = iou_from_confusion(confusion(segmenter(images).argmax(1), labels))
    assert iou["dome"] >= 0.85 and iou["spire"] >= 0.85, iou
    assert min(iou.values()) >= 0.8, iou
    assert segmenter.feature_layer == "dec2"


@pytest.mark.parametrize("edit", EDITS)
def test_bundled_requests_parse_and_use_low_seeds(edit):
    bundled = json.loads((REQUESTS_DIR / f"{edit}.json").read_text())
    request = parse_request(bundled)
    assert request.layer == "layer4"
    assert request.operation == ("erase" if edit == "erase_trees" else "copy")
    pairs = load_eval_requests(edit)
    assert len(pairs) == 5 and pairs[0] == {k: v for k, v in bundled.items() if k != "layer"}
    for raw in pairs:
        # Held-out evaluation seeds start at 1,000,000: no request may reach them.
        assert max(parse_request(raw).seeds) < 1_000_000


def test_bundled_requests_are_what_examples_finds_in_the_shipped_generator(tmp_path):
    # Requests hold boxes found in the generator's images, so a new generator needs new
    # requests; this fails if one ships without them. --out keeps demo/requests untouched.
    examples_main(["--model", str(GENERATOR_PATH), "--out", str(tmp_path)])
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json"))
    assert written == sorted(p.relative_to(REQUESTS_DIR) for p in REQUESTS_DIR.rglob("*.json"))
    for path in written:
        assert (tmp_path / path).read_text() == (REQUESTS_DIR / path).read_text(), path


def test_missing_request_folder_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="demo.examples"):
        load_eval_requests("dome_to_spire", tmp_path)
