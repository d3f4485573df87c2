"""The API client commands (palimpsest submit/jobs/show/cancel/delete/download, models list/upload/delete)
against a real HTTP server (werkzeug's, in a thread) running the real app on the embedded
defaults. A thread stands in for the worker where a job must move (through
storage.lifecycle, as a worker would)."""
import hashlib
import io
import json
import threading
import time

import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from api import create_app
from palimpsest.cli import main
from palimpsest.client import format_jobs, format_progress
from storage import lifecycle
from tests.api.v1_helpers import (  # noqa: F401
    EDIT, Tenant, add_artifact, add_job, add_model, alice, app, config, queued, safetensors_bytes, sessions,
)


def serve(app):
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_port}"


@pytest.fixture
def api_url(app):
    server, url = serve(app)
    yield url
    server.shutdown()


@pytest.fixture
def cli(api_url, alice):
    def run(*args, key=None, url=None):
        env = {"PALIMPSEST_API_URL": url or api_url, "PALIMPSEST_API_KEY": key or alice.key}
        return CliRunner().invoke(main, list(args), env=env)
    return run


@pytest.fixture
def demo(app):
    return add_model(app, None, name="demo")


@pytest.fixture
def request_file(tmp_path):
    path = tmp_path / "request.json"
    path.write_text(json.dumps(EDIT))
    return path


def test_models_list(cli, app, alice, demo):
    mine = add_model(app, alice.id, name="mine", status="pending", layers=[])
    result = cli("models", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "ARCHITECTURE", "SIZE", "LAYERS", "SHARED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[demo][1:4] == ["demo", "ready", "demo-gan"] and rows[demo][-1] == "yes"
    assert rows[mine][1:3] == ["mine", "pending"]
    assert {m["id"] for m in json.loads(cli("models", "list", "--json").stdout)} == {demo, mine}


def test_submit_prints_the_job_id(cli, app, demo, request_file):
    result = cli("submit", str(request_file), "--model", "demo", "--layer", "layer3", "--params", '{"rank": 2}',
                 "--priority", "7")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert job_id.startswith("job_") and f"submitted {job_id}" in result.stderr
    assert queued(app) == [("gpu", "workers.jobs.run_job", [job_id], 2)]
    shown = json.loads(cli("show", job_id, "--json").stdout)
    assert shown["model"] == demo and shown["params"]["rank"] == 2 and shown["priority"] == 7


def test_submit_is_idempotent_with_a_key(cli, app, demo, request_file):
    first = cli("submit", str(request_file), "--model", demo, "--layer", "layer3", "--idempotency-key", "k")
    again = cli("submit", str(request_file), "--model", demo, "--layer", "layer3", "--idempotency-key", "k")
    assert first.stdout == again.stdout and len(queued(app)) == 1


def fake_worker(app, job_id_of, outcome="succeeded", pause=1.3):
    """Run the job the way a worker would, slowly enough for the CLI's polls to see each phase."""
    def work():
        job_id = None
        while job_id is None:
            job_id = job_id_of()
            time.sleep(0.05)
        with sessions(app) as session:
            lease = lifecycle.claim(session, job_id, "fake-worker", ttl=60)
        time.sleep(pause)
        with sessions(app) as session:
            lifecycle.report_progress(session, lease, "optimizing", 50, 100, loss=0.25, milestone=True)
        time.sleep(pause)
        if outcome == "succeeded":
            add_artifact(app, job_id, "checkpoint", b"new weights")
        with sessions(app) as session:
            lifecycle.finish(session, lease, outcome, metrics={"success": 0.75} if outcome == "succeeded" else None,
                             **({"error_code": "invalid_request", "error_message": "paste: mask is empty"}
                                if outcome == "failed" else {}))
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def newest_job(app):
    from sqlalchemy import select

    from storage.models import Job

    with sessions(app) as session:
        return session.scalar(select(Job.id).order_by(Job.created_at.desc()).limit(1))


def test_submit_wait_shows_progress_until_the_end(cli, app, demo, request_file):
    worker = fake_worker(app, lambda: newest_job(app))
    result = cli("submit", str(request_file), "--model", demo, "--layer", "layer3", "--wait")
    worker.join(10)
    assert result.exit_code == 0, result.output
    progress = result.stderr.splitlines()[1:]  # after "submitted ..."
    assert progress[0] in ("queued", "running loading")
    assert "running optimizing [############............] 50/100 loss 0.25" in progress
    assert progress[-1] == "succeeded"
    assert "status    succeeded" in result.stdout
    assert 'metrics   {"success": 0.75}' in result.stdout
    assert "artifact  checkpoint" in result.stdout


def test_submit_wait_exits_1_when_the_job_fails(cli, app, demo, request_file):
    worker = fake_worker(app, lambda: newest_job(app), outcome="failed", pause=0.2)
    result = cli("submit", str(request_file), "--model", demo, "--layer", "layer3", "--wait")
    worker.join(10)
    assert result.exit_code == 1
    assert "error     invalid_request: paste: mask is empty" in result.stdout


def test_jobs_pages(cli, app, alice, demo):
    ids = [add_job(app, alice.id, demo) for _ in range(5)]
    first = cli("jobs", "--limit", "2")
    assert first.exit_code == 0, first.output
    assert len(first.stdout.splitlines()) == 3  # header + 2
    assert "more: palimpsest jobs --limit 2 --cursor " in first.stderr
    everything = cli("jobs", "--limit", "2", "--all")
    assert {line.split()[0] for line in everything.stdout.splitlines()[1:]} == set(ids)
    assert "more:" not in everything.stderr
    assert cli("jobs", "--status", "running").stdout.strip() == "no jobs"


def test_next_page_command_keeps_the_filters(cli, app, alice, demo):
    failed = {add_job(app, alice.id, demo, "failed") for _ in range(3)}
    for _ in range(3):
        add_job(app, alice.id, demo)
    first = cli("jobs", "--status", "failed", "--limit", "2")
    more = first.stderr.strip().removeprefix("more: palimpsest ").split()
    assert more[:-1] == ["jobs", "--status", "failed", "--limit", "2", "--cursor"]
    rest = cli(*more)
    assert rest.exit_code == 0, rest.output
    shown = {line.split()[0] for line in (first.stdout + rest.stdout).splitlines() if line.startswith("job_")}
    assert shown == failed and "more:" not in rest.stderr


def test_upload_of_a_file_named_with_a_quote_keeps_its_name(cli, app, tmp_path):
    path = tmp_path / 'my"model.safetensors'
    path.write_bytes(safetensors_bytes(metadata={"architecture": "demo-gan"}))
    result = cli("models", "upload", str(path))
    assert result.exit_code == 0, result.output
    model_id = result.stdout.split()[0]
    listed = json.loads(cli("models", "list", "--json").stdout)
    assert [m["name"] for m in listed if m["id"] == model_id] == [path.name]


def test_show_and_cancel(cli, app, alice, demo):
    queued_job = add_job(app, alice.id, demo)
    result = cli("cancel", queued_job)
    assert result.exit_code == 0 and result.stdout.strip() == f"{queued_job} cancelled"
    running = add_job(app, alice.id, demo, "running")
    assert cli("cancel", running).stdout.strip() == f"{running} running (stopping)"
    assert "(cancelling)" in cli("show", running).stdout
    again = cli("cancel", queued_job)
    assert again.exit_code == 1
    assert "409 job_finished" in again.stderr


def test_delete_a_job_a_model_and_a_batch(cli, app, alice, demo):
    from storage.models import Batch

    model = add_model(app, alice.id)
    job = add_job(app, alice.id, model, "succeeded")
    running = add_job(app, alice.id, demo, "running")
    refused = cli("delete", running)
    assert refused.exit_code == 1 and "409 job_not_finished" in refused.stderr
    assert cli("models", "delete", model).exit_code == 1  # its jobs name it
    with sessions(app) as session:
        batch = Batch(tenant_id=alice.id, status="completed")
        session.add(batch)
        session.flush()
        batch_id = batch.id
    assert cli("delete", job).stdout.strip() == f"{job} deleted"
    assert cli("batch", "delete", batch_id).stdout.strip() == f"{batch_id} deleted"
    assert cli("models", "delete", model).stdout.strip() == f"{model} deleted"
    assert "403 forbidden" in cli("models", "delete", demo).stderr


def test_download_checks_the_sha256(cli, app, alice, demo, tmp_path):
    job = add_job(app, alice.id, demo, "succeeded")
    data = b"\x00checkpoint bytes" * 100_000
    sha256 = add_artifact(app, job, "checkpoint", data)
    result = cli("download", job, "checkpoint", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    path = tmp_path / f"{job}-checkpoint.safetensors"
    assert path.read_bytes() == data
    assert result.stdout.strip() == f"{path}  {len(data)} bytes  sha256 {sha256}"
    # the stored object changes under the recorded sha256: refused, nothing left behind
    key = f"artifacts/{sha256}/checkpoint.bin"
    app.extensions["palimpsest_store"].put(key, io.BytesIO(data[:-1] + b"!"))
    target = tmp_path / "copy.safetensors"
    bad = cli("download", job, "checkpoint", "--out", str(target))
    assert bad.exit_code == 1 and "has sha256" in bad.stderr
    assert not target.exists() and not list(tmp_path.glob(".*partial*"))
    app.extensions["palimpsest_store"].put(key, io.BytesIO(b"truncated"))  # shorter than its Content-Length
    cut = cli("download", job, "checkpoint", "--out", str(target))
    assert cut.exit_code == 1 and "broke off" in cut.stderr
    assert not target.exists() and not list(tmp_path.glob(".*partial*"))
    missing = cli("download", job, "preview", "--out", str(tmp_path))
    assert missing.exit_code == 1 and "has no artifact 'preview'" in missing.stderr


def test_download_follows_the_s3_redirect(config, s3_server, s3_storage_url, tmp_path):
    app = create_app({**config, "PALIMPSEST_STORAGE_URL": s3_storage_url, "PALIMPSEST_S3_ENDPOINT_URL": s3_server})
    tenant = Tenant(app, "s3 user")
    job = add_job(app, tenant.id, add_model(app, None), "succeeded")
    data = bytes(range(256)) * 5000
    add_artifact(app, job, "delta", data)
    server, url = serve(app)
    try:
        result = CliRunner().invoke(main, ["download", job, "delta", "--out", str(tmp_path / "d.safetensors")],
                                    env={"PALIMPSEST_API_URL": url, "PALIMPSEST_API_KEY": tenant.key})
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d.safetensors").read_bytes() == data


def test_upload_streams_a_file(cli, app, tmp_path):
    path = tmp_path / "gan.safetensors"
    path.write_bytes(safetensors_bytes(metadata={"architecture": "demo-gan"}))
    result = cli("models", "upload", str(path), "--name", "gan", "--config", '{"z_dim": 8}')
    assert result.exit_code == 0, result.output
    model_id, status, _, sha256 = result.stdout.split()
    assert status == "pending" and sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert queued(app) == [("cpu", "workers.models.inspect_model", [model_id], 0)]


def test_api_errors_are_one_line(cli, demo, request_file):
    bad_layer = cli("submit", str(request_file), "--model", demo, "--layer", "layer9")
    assert bad_layer.exit_code == 1
    assert bad_layer.stderr.startswith("Error: 422 unknown_layer: 'layer9' is not an editable layer")
    assert bad_layer.stderr.rstrip().endswith("(field layer)")
    unauthorized = cli("jobs", key="plm_0123456789ab_" + "A" * 43)
    assert unauthorized.exit_code == 1 and "401 unauthorized" in unauthorized.stderr
    unknown = cli("show", "job_nope")
    assert unknown.exit_code == 1 and "404 job_not_found" in unknown.stderr
    ambiguous = cli("submit", str(request_file), "--model", "no-such-name", "--layer", "layer3")
    assert ambiguous.exit_code == 1 and "0 models are named 'no-such-name'" in ambiguous.stderr


def test_unreachable_api(cli):
    from stack import free_port

    result = cli("jobs", url=f"http://127.0.0.1:{free_port()}")
    assert result.exit_code == 1
    assert "cannot reach the Palimpsest API" in result.stderr


def test_bad_request_file_is_a_usage_error(cli, demo, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{nope")
    result = cli("submit", str(path), "--model", demo, "--layer", "layer3")
    assert result.exit_code == 2 and "REQUEST_FILE" in result.stderr


def job(status="running", phase="optimizing", step=None, total=None, loss=None, **extra):
    return {"id": "job_1", "status": status, "model": "mdl_1", "layer": "layer3", "created_at": "2026-01-02T03:04:05+00:00",
            "progress": {"phase": phase, "step": step, "total": total, "loss": loss}, "cancel_requested": False,
            **extra}


@pytest.mark.parametrize("value, line", [
    (job("queued", None), "queued"),
    (job(phase="loading"), "running loading"),
    (job(step=0, total=10), "running optimizing [........................] 0/10"),
    (job(step=10, total=10, loss=0.000123456), "running optimizing [########################] 10/10 loss 0.0001235"),
    (job(phase="statistics", step=3, total=0), "running statistics"),
    (job(step=5, total=10, cancel_requested=True), "running optimizing [############............] 5/10 (cancelling)"),
    (job("succeeded", "uploading", 10, 10, 0.5), "succeeded"),
])
def test_format_progress(value, line):
    assert format_progress(value) == line


def test_format_jobs():
    text = format_jobs([job(step=5, total=10, loss=0.5), job("queued", None)])
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "PHASE", "STEP", "LOSS", "MODEL", "LAYER", "CREATED", "(UTC)"]
    assert lines[1].split() == ["job_1", "running", "optimizing", "5/10", "0.5", "mdl_1", "layer3", "2026-01-02",
                                "03:04:05"]
    assert lines[2].split() == ["job_1", "queued", "mdl_1", "layer3", "2026-01-02", "03:04:05"]
    assert format_jobs([]) == "no jobs"


def test_api_url_may_name_the_v1_prefix(cli, api_url, demo):
    # the form `palimpsest serve` used to print, and an easy one to paste
    result = cli("models", "list", "--json", url=api_url + "/v1/")
    assert result.exit_code == 0, result.output
    assert [m["id"] for m in json.loads(result.stdout)] == [demo]
