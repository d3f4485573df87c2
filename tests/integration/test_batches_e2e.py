"""A batch end to end, on both stacks: `palimpsest batch submit --wait` over HTTP to a real
`palimpsest serve`, three demo edits run by a real worker, `palimpsest batch results` as
JSONL, and the signed batch.completed webhook received by a local HTTP server."""
import json
import subprocess
from pathlib import Path

import pytest

from palimpsest.client import Client
from palimpsest.webhooks import verify
from webhook_receiver import Receiver

ROOT = Path(__file__).resolve().parents[2]
DEMO_REQUEST = ROOT / "demo" / "requests" / "dome_to_spire.json"
FAST = {"samples": 256, "steps": 100}
SECRET = "e2e-webhook-secret"


def cli(stack, *args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(stack.palimpsest(*args), env={**stack.env, **(env or {})}, capture_output=True,
                          timeout=timeout)


@pytest.fixture
def service(stack):
    """The stack with webhooks allowed to 127.0.0.1 (its worker restarted to read that),
    the demo model, an API server and a tenant's key."""
    stack.variables.update({"PALIMPSEST_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "PALIMPSEST_WEBHOOK_SECRET": SECRET,
                            "PALIMPSEST_WEBHOOK_RETRY_SECONDS": "1"})
    stack.worker.stop()
    stack.worker = stack.start_worker()
    registered = cli(stack, "models", "register-demo")
    assert registered.returncode == 0, registered.stderr
    server = stack.start_server()
    created = cli(stack, "keys", "create", "--tenant", "acme")
    assert created.returncode == 0, created.stderr
    return registered.stdout.decode().strip(), server.url, created.stdout.decode().strip()


def test_batch_submit_wait_results_and_webhook(stack, service, tmp_path):
    model_id, url, key = service
    request = json.loads(DEMO_REQUEST.read_text())
    layer = request.pop("layer")
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps({"custom_id": name, "model": model_id, "layer": layer, "request": request,
                                         "params": {**FAST, "rank": rank}}) + "\n"
                             for name, rank in (("spire-1", 1), ("spire-2", 2), ("spire-3", 3))))
    client_env = {"PALIMPSEST_API_URL": url, "PALIMPSEST_API_KEY": key}

    with Receiver([200]) as receiver:
        done = cli(stack, "batch", "submit", str(edits), "--wait", "--webhook", f"{receiver.url}/hooks/batch",
                   "--json", env=client_env)
        assert done.returncode == 0, done.stderr.decode()
        batch = json.loads(done.stdout)
        assert batch["status"] == "completed"
        assert batch["request_counts"] == {"total": 3, "succeeded": 3, "failed": 0, "cancelled": 0}
        progress = done.stderr.decode()
        assert f"submitted {batch['id']} (3 edits)" in progress
        assert "completed [########################] 3/3 (3 succeeded, 0 failed, 0 cancelled)" in progress

        (notice,) = receiver.wait_for(1, timeout=60)
    assert notice.path == "/hooks/batch"
    verify(SECRET, notice.headers["Palimpsest-Signature"], notice.body)
    body = json.loads(notice.body)
    assert body["type"] == "batch.completed"
    assert (body["data"]["id"], body["data"]["status"]) == (batch["id"], "completed")
    assert body["data"]["request_counts"]["succeeded"] == 3

    out = cli(stack, "batch", "results", batch["id"], env=client_env)
    assert out.returncode == 0, out.stderr.decode()
    lines = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [(r["custom_id"], r["status"], r["error"]) for r in lines] == [
        ("spire-1", "succeeded", None), ("spire-2", "succeeded", None), ("spire-3", "succeeded", None)]
    client = Client(url, key)
    for result in lines:
        assert {a["name"] for a in result["artifacts"]} == {"delta", "checkpoint", "preview", "metrics"}
        assert result["metrics"]["constraint_loss"] is not None
        assert result["metrics"]["steps"] <= FAST["steps"]
        job = client.job(result["job"])
        assert (job["batch"], job["priority"]) == (batch["id"], 2)
    # the artifact links work: the metrics file of the first edit, checked against its sha256
    path, _, _ = client.download(lines[0]["job"], "metrics", tmp_path)
    assert json.loads(path.read_text())["constraint_loss"] == lines[0]["metrics"]["constraint_loss"]
    # the three edits shared one statistic
    statistics = {r["metrics"]["statistic"]["id"] for r in lines}
    assert len(statistics) == 1

    listed = cli(stack, "batch", "list", env=client_env)
    assert batch["id"] in listed.stdout.decode()
