"""`palimpsest batch submit/results/list/show/cancel` against a real HTTP server (werkzeug's,
in a thread) running the real app on the embedded defaults. A thread stands in for the
worker: it moves members through storage.lifecycle and calls the hook a worker calls."""
import json
import threading
import time

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from werkzeug.serving import make_server

from palimpsest.cli import main
from storage import lifecycle
from storage.models import Job
from v1_helpers import EDIT, add_artifact, add_model, alice, app, client, config, queued, sessions  # noqa: F401
from workers.batches import refresh_batch


@pytest.fixture
def api_url(app):
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def cli(api_url, alice):
    def run(*args):
        return CliRunner().invoke(main, list(args), env={"PALIMPSEST_API_URL": api_url,
                                                         "PALIMPSEST_API_KEY": alice.key})
    return run


@pytest.fixture
def model(app):
    return add_model(app, None, name="demo")


def edits_file(tmp_path, model, n=3, bad=None):
    path = tmp_path / "edits.jsonl"
    lines = [json.dumps({"custom_id": f"e{i}", "model": model, "layer": "layer3", "request": EDIT}) for i in range(n)]
    if bad is not None:
        lines[bad] = json.dumps({"custom_id": f"e{bad}", "model": model, "layer": "layer9", "request": EDIT})
    path.write_text("\n".join(lines) + "\n")
    return path


def members(app, batch_id):
    with sessions(app) as session:
        return list(session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.created_at)))


def fake_worker(app, outcomes, pause=1.2):
    """End the newest batch's members one by one (``outcomes``), as workers would."""
    def work():
        from storage.models import Batch

        batch_id = None
        while batch_id is None:
            with sessions(app) as session:
                batch_id = session.scalar(select(Batch.id).where(Batch.status == "in_progress"))
            time.sleep(0.05)
        for job_id, outcome in zip(members(app, batch_id), outcomes):
            time.sleep(pause)
            with sessions(app) as session:
                lease = lifecycle.claim(session, job_id, "fake-worker", ttl=60)
                lifecycle.finish(session, lease, outcome, **({"error_code": "boom", "error_message": "it broke"}
                                                             if outcome == "failed" else {}))
            refresh_batch(app.extensions["palimpsest_db"].session_factory, batch_id, app.extensions["celery"])
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_submit_prints_the_batch_id(cli, app, model, tmp_path):
    result = cli("batch", "submit", str(edits_file(tmp_path, model)), "--priority", "3")
    assert result.exit_code == 0, result.output
    batch_id = result.stdout.strip()
    assert batch_id.startswith("bat_") and f"submitted {batch_id} (3 edits)" in result.stderr
    assert len(queued(app)) == 3 and {m[3] for m in queued(app)} == {9 - 3}
    shown = cli("batch", "show", batch_id)
    assert "in_progress [" in shown.stdout and "0/3" in shown.stdout and "priority  3" in shown.stdout
    assert json.loads(cli("batch", "show", batch_id, "--json").stdout)["id"] == batch_id
    listed = cli("batch", "list").stdout.splitlines()
    assert listed[0].split()[:3] == ["ID", "STATUS", "TOTAL"]
    assert listed[1].split()[:3] == [batch_id, "in_progress", "3"]


def test_a_refused_batch_prints_each_bad_line(cli, app, model, tmp_path):
    result = cli("batch", "submit", str(edits_file(tmp_path, model, bad=1)))
    assert result.exit_code == 1
    assert "422 invalid_batch: 1 of 3 lines are invalid; nothing was queued (field body)" in result.stderr
    assert "line 2, layer: " in result.stderr
    assert queued(app) == []


def test_submit_wait_draws_progress_over_request_counts(cli, app, model, tmp_path):
    worker = fake_worker(app, ["succeeded", "succeeded", "succeeded"])
    result = cli("batch", "submit", str(edits_file(tmp_path, model)), "--wait")
    worker.join()
    assert result.exit_code == 0, result.output
    progress = [line for line in result.stderr.splitlines() if line.startswith(("in_progress", "completed"))]
    assert progress[0].startswith("in_progress [........................] 0/3")
    assert progress[-1] == "completed [########################] 3/3 (3 succeeded, 0 failed, 0 cancelled)"
    assert len(progress) >= 3  # a line whenever the counts change (not a terminal here)
    assert "status    completed" in result.stdout


def test_submit_wait_exits_1_when_an_edit_failed(cli, app, model, tmp_path):
    worker = fake_worker(app, ["succeeded", "failed"], pause=0.3)
    result = cli("batch", "submit", str(edits_file(tmp_path, model, n=2)), "--wait", "--json")
    worker.join()
    assert result.exit_code == 1
    assert json.loads(result.stdout)["request_counts"] == {"total": 2, "succeeded": 1, "failed": 1, "cancelled": 0}


def test_results_go_to_stdout_as_jsonl(cli, app, model, tmp_path):
    batch_id = cli("batch", "submit", str(edits_file(tmp_path, model))).stdout.strip()
    first, second, _ = members(app, batch_id)
    with sessions(app) as session:
        lease = lifecycle.claim(session, first, "w", ttl=60)
        lifecycle.finish(session, lease, "succeeded", metrics={"constraint_loss": 0.1})
    add_artifact(app, first, "metrics", b"{}", "application/json")
    with sessions(app) as session:
        lease = lifecycle.claim(session, second, "w", ttl=60)
        lifecycle.finish(session, lease, "failed", error_code="boom", error_message="it broke")
    result = cli("batch", "results", batch_id)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["custom_id"], r["status"]) for r in lines] == [("e0", "succeeded"), ("e1", "failed"), ("e2", "queued")]
    assert lines[0]["artifacts"][0]["name"] == "metrics" and lines[1]["error"]["code"] == "boom"


def test_cancel(cli, app, model, tmp_path):
    batch_id = cli("batch", "submit", str(edits_file(tmp_path, model))).stdout.strip()
    assert cli("batch", "cancel", batch_id).stdout.strip() == f"{batch_id} cancelled"
    again = cli("batch", "cancel", batch_id)
    assert again.exit_code == 1 and "409 batch_finished" in again.stderr
    missing = cli("batch", "show", "bat_nope")
    assert missing.exit_code == 1 and "404 batch_not_found" in missing.stderr
