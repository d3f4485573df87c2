"""The engine's commands on a tiny checkpoint: through click's CliRunner and as `python -m rewriting`."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rewriting.checkpoint import file_sha256, load_model, load_state
from rewriting.cli import edit, main, sample, stats
from rewriting.delta import EditDelta
from rewriting.statistics import SecondMoment

from .edit_fixtures import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
LAYER = "layer4"  # 8x8 in the tiny demo-gan


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_tiny_checkpoint(d / "base.safetensors")
    request = {
        "copy": {"seed": 1, "mask": [0.0, 0.0, 0.5, 0.5]},
        "paste": {"seed": 2, "mask": [0.5, 0.5, 1.0, 1.0]},
        "context": [{"seed": 2, "mask": [0.5, 0.5, 1.0, 1.0]}, {"seed": 3, "mask": [0.0, 0.5, 0.5, 1.0]}],
        "params": {"steps": 200},
    }
    (d / "edit.json").write_text(json.dumps(request))
    return d


def invoke(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    return result


def test_stats_then_edit_with_stats(files):
    base, stat = files / "base.safetensors", files / "stats.safetensors"
    r = invoke(stats, ["--model", base, "--layer", LAYER, "--samples", 40, "--out", stat, "--batch-size", 16])
    assert r.exit_code == 0, r.output
    moment = SecondMoment.load(stat)
    assert moment.count == 40 * 8 * 8 and moment.metadata["layer"] == LAYER
    assert moment.metadata["model_sha256"] == file_sha256(base)

    out, delta = files / "edited.safetensors", files / "edit.delta.safetensors"
    r = invoke(edit, ["--model", base, "--layer", LAYER, "--request", files / "edit.json", "--out", out,
                      "--delta", delta, "--stats", stat, "--preview", files / "preview.png"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["constraint_loss"] < summary["initial_loss"]
    assert summary["out_sha256"] == file_sha256(out)
    # the edited checkpoint differs from the base in the target weight only, and loads
    a, _ = load_state(base)
    b, meta = load_state(out)
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["layer4.conv.weight"]
    assert meta["base_sha256"] == file_sha256(base)
    load_model(out)
    d = EditDelta.load(delta)
    assert d.param == "layer4.conv.weight" and d.base_sha256 == file_sha256(base)
    assert os.path.getsize(delta) < 16_000
    im = Image.open(files / "preview.png")
    assert im.size == (3 * 18 + 2, 2 * 18 + 2)  # seeds 1, 2, 3: before row and after row


def test_edit_computes_the_statistic_and_takes_param_overrides(files):
    out = files / "edited2.safetensors"
    r = invoke(edit, ["--model", files / "base.safetensors", "--layer", LAYER, "--request", files / "edit.json",
                      "--out", out, "--samples", 8, "--param", "steps=5", "--param", "method=projected",
                      "--param", "plateau_patience=0"])
    assert r.exit_code == 0, r.output
    assert "stats: computing" in r.output
    assert json.loads(r.output.strip().splitlines()[-1])["steps"] == 5


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layer", "layer99"], "layer1"),  # lists the valid layers
        (["--layer", LAYER, "--param", "lr=NaN"], "params.lr"),
        (["--layer", LAYER, "--param", "rank=999"], "params.rank"),
        ([], "--layer"),
    ],
)
def test_edit_errors_are_one_line_messages(files, extra, message):
    r = CliRunner().invoke(edit, ["--model", str(files / "base.safetensors"), "--request", str(files / "edit.json"),
                                  "--out", str(files / "bad.safetensors"), "--samples", "4", *extra])
    assert r.exit_code != 0
    assert message in r.output
    assert "Traceback" not in r.output
    assert "stats:" not in r.output  # refused before the statistic's forward passes
    assert not (files / "bad.safetensors").exists()


def test_edit_layer_replaces_the_requests_own(files):
    request = json.loads((files / "edit.json").read_text())
    (files / "edit_layer3.json").write_text(json.dumps({**request, "layer": "layer3"}))
    r = invoke(edit, ["--model", files / "base.safetensors", "--layer", LAYER, "--request", files / "edit_layer3.json",
                      "--out", files / "edited3.safetensors", "--samples", 8, "--param", "steps=5"])
    assert r.exit_code == 0, r.output
    assert f"--layer {LAYER} instead of the request's layer3" in r.output
    assert json.loads(r.output.strip().splitlines()[-1])["layer"] == LAYER


def test_sample_grid_and_before_after(files):
    grid = files / "grid.png"
    r = invoke(sample, ["--model", files / "base.safetensors", "--seeds", "0-5", "--columns", 3,
                        "--out", grid, "--scale", 2])
    assert r.exit_code == 0, r.output
    im = np.asarray(Image.open(grid))
    assert im.shape == (2 * 34 + 2, 3 * 34 + 2, 3)  # 2 rows x 3 columns of 32px tiles
    delta = files / "edit.delta.safetensors"
    if not delta.exists():
        pytest.skip("needs the delta from test_stats_then_edit_with_stats")
    r = invoke(sample, ["--model", files / "base.safetensors", "--seeds", "1-3", "--delta", delta, "--out", grid])
    assert r.exit_code == 0, r.output
    im = np.asarray(Image.open(io.BytesIO(grid.read_bytes())))
    assert im.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    top, bottom = im[2:18, 2 + 18:18 + 18], im[20:36, 2 + 18:18 + 18]  # seed 2 (the paste image)
    assert np.abs(top.astype(int) - bottom.astype(int)).max() > 0


def test_python_m_rewriting_runs_as_a_subprocess(files, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "rewriting", "edit", "--model", str(files / "base.safetensors"),
           "--layer", LAYER, "--request", str(files / "edit.json"), "--out", str(tmp_path / "e.safetensors"),
           "--samples", "8", "--param", "steps=20", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 20 and (tmp_path / "e.safetensors").exists()
    help_ = subprocess.run([sys.executable, "-m", "rewriting", "--help"], capture_output=True, text=True, env=env)
    assert all(c in help_.stdout for c in ("edit", "stats", "sample"))


def test_group_lists_the_commands():
    assert set(main.commands) == {"edit", "stats", "sample"}
