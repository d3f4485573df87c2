"""The training scripts run end to end on the CPU (tiny configurations) and resume."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from demo import train_generator, train_segmenter
from rewriting.checkpoint import load_model
from rewriting.seeds import latents


def test_tiny_generator_trains_saves_and_resumes(tmp_path):
    out = tmp_path / "gan"
    train_generator.main(["--config", "tiny", "--out", str(out), "--device", "cpu"])
    record = json.loads((out / "generator.json").read_text())
    assert record["iterations"] == 30 and record["finished"] and record["device"].startswith("cpu")
    assert {"loss_d", "loss_g", "r1"} <= set(record["final"])
    G = load_model(out / "generator.safetensors")
    assert G.z_dim == 16
    images = G(latents(range(3), G.z_dim))
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1
    first = load_file(str(out / "generator.safetensors"))

    # Resuming at the last iteration trains nothing: the saved EMA weights come back as they were.
    again = tmp_path / "again"
    train_generator.main(["--config", "tiny", "--out", str(again), "--device", "cpu",
                          "--resume", str(out / "train_state.safetensors")])
    same = load_file(str(again / "generator.safetensors"))
    assert all(torch.equal(first[k], same[k]) for k in first)

    # Resuming with more iterations continues from 30, not from 0.
    more = tmp_path / "more"
    train_generator.main(["--config", "tiny", "--out", str(more), "--device", "cpu", "--iterations", "40",
                          "--resume", str(out / "train_state.safetensors")])
    record = json.loads((more / "generator.json").read_text())
    assert record["iterations"] == 40 and record["images_seen"] == 40 * 8
    moved = load_file(str(more / "generator.safetensors"))
    assert any(not torch.equal(first[k], moved[k]) for k in first)


def test_latent_spread_is_image_distance_over_latent_distance():
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [1.0, 3.0]])  # halves: rows 0-1 against 2-3
    same = torch.ones(4, 3, 2, 2)
    assert train_generator.latent_spread(same, z).item() == 0  # distinct latents, one image: collapse
    fakes = torch.zeros(4, 3, 2, 2)
    fakes[2:] = 0.5  # every pixel of a pair differs by 0.5; latents by |2|,|0|,|0|,|2|: mean 1
    assert abs(train_generator.latent_spread(fakes, z).item() - 0.5) < 1e-7


def test_mode_seeking_term_changes_training_and_is_recorded(tmp_path):
    plain, again, seeking = tmp_path / "plain", tmp_path / "again", tmp_path / "seeking"
    common = ["--config", "tiny", "--device", "cpu", "--iterations", "10", "--r1-gamma", "2"]
    train_generator.main(common + ["--out", str(plain)])
    train_generator.main(common + ["--out", str(again)])
    train_generator.main(common + ["--out", str(seeking), "--diversity", "1"])
    record = json.loads((seeking / "generator.json").read_text())
    assert record["train_config"]["diversity"] == 1 and record["train_config"]["r1_gamma"] == 2
    assert record["final"]["spread"] > 0
    assert json.loads((plain / "generator.json").read_text())["train_config"]["diversity"] == 0
    assert train_generator.CONFIGS["full"].diversity == 1  # as the shipped generator was trained
    a, b = load_file(str(plain / "generator.safetensors")), load_file(str(seeking / "generator.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # Training is deterministic, so the difference above is the term's, not run-to-run noise.
    same = load_file(str(again / "generator.safetensors"))
    assert all(torch.equal(a[k], same[k]) for k in a)


def test_tiny_segmenter_trains_and_reports_iou(tmp_path):
    train_segmenter.main(["--config", "tiny", "--out", str(tmp_path), "--device", "cpu"])
    record = json.loads((tmp_path / "segmenter.json").read_text())
    assert record["iterations"] == 20 and record["final"]["heldout_images"] == 16
    assert set(record["final"]["iou"]) == {"sky", "ground", "building", "dome", "spire", "tree"}
    S = load_model(tmp_path / "segmenter.safetensors")
    assert S(torch.zeros(2, 3, 32, 32)).shape == (2, 6, 32, 32)


def test_scenes_rendered_several_batches_a_call_train_the_same(tmp_path):
    # CUDA renders 16 batches a call (fewer kernel launches); the run must not change.
    one, four = tmp_path / "one", tmp_path / "four"
    common = ["--config", "tiny", "--device", "cpu", "--iterations", "10"]
    train_generator.main(common + ["--out", str(one), "--render-batches", "1"])
    train_generator.main(common + ["--out", str(four), "--render-batches", "4"])
    a, b = load_file(str(one / "generator.safetensors")), load_file(str(four / "generator.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((four / "generator.json").read_text())["train_config"]["render_batches"] == 4


def test_a_negative_render_batches_is_refused_not_looped_on():
    with pytest.raises(ValueError, match="render_batches"):
        replace(train_generator.CONFIGS["tiny"], render_batches=-1)
