"""A merged batch end to end, over HTTP, with a real server and a real worker on both
stacks: submit with ``merge``, the members run, the batch finalizes, ``merge_batch``
solves them jointly, and the batch resource shows the merge with its report and its
files, downloadable and matching their sha256."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from palimpsest.client import Client
from storage.db import make_engine, make_session_factory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workers"))
from job_fixtures import LAYER, fast_params, save_generator  # noqa: E402


def cli(stack, *args: str) -> str:
    done = subprocess.run(stack.palimpsest(*args), env=stack.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def copy_between(source, target):
    return {"operation": "copy", "copy": {"seed": source, "mask": [0.0, 0.0, 0.5, 0.5]},
            "paste": {"seed": target, "mask": [0.5, 0.5, 1.0, 1.0]},
            "context": [{"seed": target, "mask": [0.5, 0.5, 1.0, 1.0]}]}


def test_merged_batch_end_to_end(stack, tmp_path):
    from workers.models import register_model_file

    path = save_generator(tmp_path / "generator.safetensors", seed=3)
    model_id = register_model_file(make_session_factory(make_engine(stack.settings.database_url)), stack.store(),
                                   path, name="tiny")
    server = stack.start_server()
    client = Client(server.url, cli(stack, "keys", "create", "--tenant", "acme"))
    lines = [{"custom_id": f"rule-{i}", "model": model_id, "layer": LAYER, "request": copy_between(s, t),
              "params": fast_params(steps=60)} for i, (s, t) in enumerate([(1, 2), (5, 6), (9, 10)])]
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    batch = client.submit_batch(tmp_path / "edits.jsonl", merge=True)
    final = client.wait_batch(batch["id"], interval=0.5, timeout=600)
    assert final["status"] == "completed" and final["request_counts"]["succeeded"] == 3, final
    (merge,) = final["merges"]
    assert (merge["status"], merge["layer"], merge["rules"], merge["model"]) == ("succeeded", LAYER, 3, model_id)

    report = merge["report"]
    assert [r["custom_id"] for r in report["per_rule"]] == ["rule-0", "rule-1", "rule-2"]
    results = {json.loads(line)["custom_id"]: json.loads(line) for line in client.batch_results(batch["id"])}
    for rule in report["per_rule"]:  # each rule's loss alone is its own job's, merged is lower than unedited
        metrics = results[rule["custom_id"]]["metrics"]
        assert abs(rule["alone_loss"] - metrics["constraint_loss"]) <= 1e-4 * metrics["constraint_loss"]
        assert rule["merged_loss"] < rule["initial_loss"]

    files = {a["name"]: a for a in merge["artifacts"]}
    assert set(files) == {"delta", "checkpoint", "report"}
    data = client.request("GET", files["checkpoint"]["url"]).content
    assert hashlib.sha256(data).hexdigest() == files["checkpoint"]["sha256"]
    (tmp_path / "merged.safetensors").write_bytes(data)
    base, merged = load_file(path), load_file(tmp_path / "merged.safetensors")
    assert [k for k in base if not torch.equal(base[k], merged[k])] == [f"{LAYER}.conv.weight"]
    assert json.loads(client.request("GET", files["report"]["url"]).content) == report
