"""POST/GET /v1/batches: whole-or-nothing validation with line numbers, limits, accepting
(one transaction, one message per member), listing, cancel, and the results JSONL.

The app runs on a migrated SQLite file, the embedded SQL broker and a file store; the
messages the API queued are read back from the broker (``queued``)."""
import io
import json
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from api import create_app
from api.auth import create_key
from storage import lifecycle
from storage.db import session_scope
from storage.models import Batch, Job, WebhookDelivery
from v1_helpers import (  # noqa: F401
    EDIT, add_artifact, add_model, alice, app, bob, client, config, queued, sessions,
)
from workers.batches import refresh_batch

RUN_JOB = "workers.jobs.run_job"


@pytest.fixture
def config(tmp_path, sqlite_url):  # noqa: F811
    from stack import embedded_stack

    return {**embedded_stack(tmp_path).settings.as_flask_config(), "TESTING": True,
            "PALIMPSEST_DATABASE_URL": sqlite_url, "PALIMPSEST_BATCH_MAX_LINES": 5,
            "PALIMPSEST_BATCH_MAX_BYTES": 256 * 1024, "PALIMPSEST_WEBHOOK_ALLOWED_HOSTS": ("hooks.example.com",),
            "PALIMPSEST_WEBHOOK_SECRET": "s3cret"}


@pytest.fixture
def model(app, alice):
    return add_model(app, alice.id)


def line(model_id, custom_id, **changes):
    item = {"custom_id": custom_id, "model": model_id, "layer": "layer3", "request": EDIT, "params": {"rank": 1}}
    for key, value in changes.items():
        if value is None:
            item.pop(key, None)
        else:
            item[key] = value
    return json.dumps(item)


def jsonl(*lines) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def post(client, tenant, data: bytes, query="", content_type="application/jsonl"):
    return client.post(f"/v1/batches{query}", data=data, content_type=content_type, headers=tenant.headers)


def counts(app):
    with sessions(app) as session:
        return (session.scalar(select(func.count()).select_from(Batch)),
                session.scalar(select(func.count()).select_from(Job)))


# -- refused whole: status, code, and each bad line's number and field ------------------------

def good(m, n):
    return line(m, f"c{n}")


INVALID = [
    # (id, lines (a function of the model id), status, code, [(line, field), ...])
    ("bad-json", lambda m: [good(m, 1), '{"custom_id": "c2", "model":', good(m, 3)], 422, "invalid_batch",
     [(2, None)]),
    ("not-an-object", lambda m: ["[1, 2]"], 422, "invalid_batch", [(1, None)]),
    ("no-custom-id", lambda m: [line(m, None)], 422, "invalid_batch", [(1, "custom_id")]),
    ("custom-id-not-string", lambda m: [line(m, 7)], 422, "invalid_batch", [(1, "custom_id")]),
    ("custom-id-too-long", lambda m: [line(m, "x" * 201)], 422, "invalid_batch", [(1, "custom_id")]),
    ("no-model", lambda m: [good(m, 1), line(m, "c2", model=None)], 422, "invalid_batch", [(2, "model")]),
    ("unknown-model", lambda m: [line("mdl_nope", "c1")], 422, "invalid_batch", [(1, "model")]),
    ("no-request", lambda m: [line(m, "c1", request=None)], 422, "invalid_batch", [(1, "request")]),
    ("bad-mask", lambda m: [line(m, "c1", request={**EDIT, "paste": {"seed": 2, "mask": [0.5, 0.5, 0.1, 0.1]}})],
     422, "invalid_batch", [(1, "request.paste.mask")]),
    ("bad-layer", lambda m: [good(m, 1), good(m, 2), line(m, "c3", layer="layer9")], 422, "invalid_batch",
     [(3, "layer")]),
    ("bad-params", lambda m: [line(m, "c1", params={"rank": 0})], 422, "invalid_batch", [(1, "params.rank")]),
    ("field-a-line-cannot-set", lambda m: [line(m, "c1", priority=9)], 422, "invalid_batch", [(1, "priority")]),
    ("duplicate-custom-id", lambda m: [good(m, 1), good(m, 2), good(m, 1)], 422, "invalid_batch",
     [(3, "custom_id")]),
    ("nested-too-deeply", lambda m: [good(m, 1), "[" * 100_000 + "]" * 100_000], 422, "invalid_batch", [(2, None)]),
    ("every-bad-line-listed", lambda m: [good(m, 1), line(m, "c2", layer="layer9"), good(m, 3), "nope"], 422,
     "invalid_batch", [(2, "layer"), (4, None)]),
    ("blank-lines-keep-numbering", lambda m: ["", good(m, 1), "  ", line(m, "c2", model=None)], 422,
     "invalid_batch", [(4, "model")]),
    ("too-many-lines", lambda m: [good(m, n) for n in range(6)], 422, "invalid_batch", [(6, None)]),
    ("too-many-bytes", lambda m: [line(m, "c1", params={"rank": 1, "steps": 10}) + " " * 256 * 1024], 413,
     "payload_too_large", None),
    ("empty", lambda m: ["", ""], 422, "invalid_batch", []),
]


@pytest.mark.parametrize("make_lines, status, code, details", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_a_bad_batch_is_refused_whole_naming_each_line(app, client, alice, model, make_lines, status, code,
                                                       details):
    response = post(client, alice, jsonl(*make_lines(model)))
    assert response.status_code == status, response.json
    error = response.json["error"]
    assert error["code"] == code and error["message"]
    if details is not None:
        assert error["field"] == "body"
        assert [(d["line"], d["field"]) for d in error["details"]] == details
        assert all(d["message"] for d in error["details"])
    assert counts(app) == (0, 0)  # no batch, no job
    assert queued(app) == []  # no message


def test_the_refusal_reads_like_the_single_job_one(client, alice, model):
    response = post(client, alice, jsonl(line(model, "c1", layer="layer9")))
    detail = response.json["error"]["details"][0]
    single = client.post("/v1/jobs", json={"model": model, "layer": "layer9", "request": EDIT},
                         headers=alice.headers).json["error"]
    assert (detail["field"], detail["message"]) == (single["field"], single["message"])


def test_not_utf8_names_the_line(app, client, alice, model):
    response = post(client, alice, jsonl(good(model, 1)) + b'{"custom_id": "\xff"}\n')
    assert response.status_code == 422
    assert [(d["line"], d["field"]) for d in response.json["error"]["details"]] == [(2, None)]
    assert counts(app) == (0, 0)


def test_another_tenants_model_is_unknown(app, client, bob, model):
    response = post(client, bob, jsonl(good(model, 1)))
    assert response.status_code == 422
    assert response.json["error"]["details"][0]["field"] == "model"


@pytest.mark.parametrize("query, field", [
    ("?priority=10", "priority"), ("?priority=high", "priority"), ("?priority=%C2%B2", "priority"),
    ("?priority=" + "9" * 5000, "priority"),
    ("?merge=maybe", "merge"),
    ("?webhook=https://evil.example.org/x", "webhook"), ("?webhook=ftp://hooks.example.com/x", "webhook"),
    ("?colour=red", "colour"),
])
def test_bad_batch_options_are_422(app, client, alice, model, query, field):
    response = post(client, alice, jsonl(good(model, 1)), query)
    assert response.status_code == 422
    assert response.json["error"]["field"] == field
    assert counts(app) == (0, 0) and queued(app) == []


def test_other_content_types_are_415(client, alice, model):
    response = client.post("/v1/batches", json={"custom_id": "c1"}, headers=alice.headers)
    assert response.status_code == 415
    assert response.json["error"]["code"] == "unsupported_media_type"


def test_bytes_limit_holds_without_content_length(app, client, alice, model):
    """A chunked body (no Content-Length) is cut off at the limit too."""
    body = jsonl(line(model, "c1") + " " * 256 * 1024)
    # as gunicorn hands over a chunked body: already decoded, its end marked by wsgi.input_terminated
    response = client.post("/v1/batches", input_stream=io.BytesIO(body), content_type="application/jsonl",
                           headers=alice.headers, environ_overrides={"wsgi.input_terminated": True})
    assert response.status_code == 413
    assert counts(app) == (0, 0)


# -- accepted whole -----------------------------------------------------------------------------

def test_accepted_batch_queues_every_member_once_below_interactive_priority(app, client, alice, model):
    ids = [f"edit-{n}" for n in (3, 1, 2)]
    response = post(client, alice, jsonl(*(line(model, custom_id) for custom_id in ids)))
    assert response.status_code == 202, response.json
    batch = response.json
    assert response.headers["Location"] == f"/v1/batches/{batch['id']}"
    assert batch["status"] == "in_progress"
    assert batch["request_counts"] == {"total": 3, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert (batch["merge"], batch["priority"], batch["webhook"], batch["error"]) == (False, 2, None, None)

    with sessions(app) as session:
        jobs = list(session.scalars(select(Job).order_by(Job.created_at, Job.id)))
        assert [j.custom_id for j in jobs] == ids  # the file's order
        assert {(j.batch_id, j.status, j.priority, j.webhook_url, j.tenant_id) for j in jobs} == {
            (batch["id"], "queued", 2, None, alice.id)}
        job_ids = [j.id for j in jobs]
    messages = queued(app)
    assert sorted(m[2][0] for m in messages) == sorted(job_ids)  # one message each
    assert {(m[0], m[1], m[3]) for m in messages} == {("gpu", RUN_JOB, 9 - 2)}  # kombu: 0 runs first

    # the member is the job POST /v1/jobs makes of the same body
    single = client.post("/v1/jobs", json={"model": model, "layer": "layer3", "request": EDIT, "params": {"rank": 1}},
                         headers=alice.headers).json
    member = client.get(f"/v1/jobs/{job_ids[0]}", headers=alice.headers).json
    assert (member["params"], member["layer"], member["batch"]) == (single["params"], single["layer"], batch["id"])
    assert single["priority"] == 5 > member["priority"]


def test_x_ndjson_and_options_in_the_query(app, client, alice, model):
    response = post(client, alice, jsonl(good(model, 1)),
                    "?merge=true&priority=7&webhook=https://hooks.example.com/b", "application/x-ndjson")
    assert response.status_code == 202, response.json
    assert (response.json["merge"], response.json["priority"], response.json["webhook"]) == (
        True, 7, "https://hooks.example.com/b")
    assert [m[3] for m in queued(app)] == [9 - 7]


def test_uploaded_file_with_form_fields(app, client, alice, model):
    data = {"file": (io.BytesIO(jsonl(good(model, 1), good(model, 2))), "edits.jsonl"), "merge": "true",
            "priority": "1"}
    response = client.post("/v1/batches", data=data, content_type="multipart/form-data", headers=alice.headers)
    assert response.status_code == 202, response.json
    assert response.json["request_counts"]["total"] == 2
    assert (response.json["merge"], response.json["priority"]) == (True, 1)
    with sessions(app) as session:
        batch = session.get(Batch, response.json["id"])
        stored = app.extensions["palimpsest_store"].open(batch.input_object_key).read()
    assert stored == jsonl(good(model, 1), good(model, 2))  # the input is kept
    assert batch.input_object_key.startswith(f"tenants/{alice.id}/")


def test_uploaded_file_errors_name_the_file(app, client, alice, model):
    data = {"file": (io.BytesIO(jsonl(good(model, 1), "oops")), "edits.jsonl")}
    response = client.post("/v1/batches", data=data, content_type="multipart/form-data", headers=alice.headers)
    assert response.status_code == 422
    assert response.json["error"]["field"] == "file"
    assert [d["line"] for d in response.json["error"]["details"]] == [2]
    missing = client.post("/v1/batches", data={"merge": "true"}, content_type="multipart/form-data",
                          headers=alice.headers)
    assert (missing.status_code, missing.json["error"]["field"]) == (422, "file")
    assert counts(app) == (0, 0)


def test_unqueueable_batch_fails_whole_and_answers_503(config, tmp_path):
    from stack import free_port

    app = create_app({**config, "PALIMPSEST_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    app.extensions["celery"].conf.broker_connection_max_retries = 0
    app.extensions["celery"].conf.task_publish_retry = False
    with session_scope(app.extensions["palimpsest_db"].session_factory) as session:
        key, _ = create_key(session, "t")
    model = add_model(app, None)
    response = app.test_client().post("/v1/batches", data=jsonl(good(model, 1), good(model, 2)),
                                      content_type="application/jsonl", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 503
    with sessions(app) as session:
        batch = session.scalars(select(Batch)).one()
        assert (batch.status, batch.error_code) == ("failed", "queue_unavailable")
        assert batch.failed_count == 2
        assert {(j.status, j.error_code) for j in session.scalars(select(Job))} == {("failed", "queue_unavailable")}


# -- reading -------------------------------------------------------------------------------------

def submit_batch(client, tenant, model, n=2, query=""):
    response = post(client, tenant, jsonl(*(good(model, i) for i in range(n))), query)
    assert response.status_code == 202, response.json
    return response.json


def test_show_and_list_are_the_tenants_own(app, client, alice, bob, model):
    made = [submit_batch(client, alice, model)["id"] for _ in range(5)]
    assert client.get(f"/v1/batches/{made[0]}", headers=alice.headers).json["id"] == made[0]
    other = client.get(f"/v1/batches/{made[0]}", headers=bob.headers)
    assert (other.status_code, other.json["error"]["code"]) == (404, "batch_not_found")
    assert client.get("/v1/batches", headers=bob.headers).json == {"batches": [], "next_cursor": None}

    seen, cursor = [], None
    while True:
        page = client.get("/v1/batches", query_string={"limit": 2, **({"cursor": cursor} if cursor else {})},
                          headers=alice.headers).json
        seen += [b["id"] for b in page["batches"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(made) and len(seen) == 5
    listed = client.get("/v1/batches?status=in_progress", headers=alice.headers).json["batches"]
    assert len(listed) == 5
    assert client.get("/v1/batches?status=completed", headers=alice.headers).json["batches"] == []
    assert len(client.get(f"/v1/batches?model={model}", headers=alice.headers).json["batches"]) == 5
    assert client.get(f"/v1/batches?model={model}", headers=bob.headers).json["batches"] == []
    assert client.get("/v1/batches?model=mdl_other", headers=alice.headers).json["batches"] == []
    assert client.get("/v1/batches?status=nope", headers=alice.headers).status_code == 422
    assert client.get("/v1/batches?limit=0", headers=alice.headers).status_code == 422
    superscript = client.get("/v1/batches?limit=%C2%B2", headers=alice.headers)  # "²".isdigit() is True
    assert superscript.status_code == 422 and superscript.json["error"]["field"] == "limit"
    assert client.get("/v1/batches?cursor=zzz", headers=alice.headers).status_code == 422
    members = client.get(f"/v1/jobs?batch={made[0]}", headers=alice.headers).json["jobs"]
    assert {j["batch"] for j in members} == {made[0]} and len(members) == 2


def member_ids(app, batch_id):
    with sessions(app) as session:
        return list(session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.created_at)))


def run(app, job_id, status, **fields):
    """What a worker does: claim, then finish."""
    with sessions(app) as session:
        lease = lifecycle.claim(session, job_id, "test-worker", ttl=60)
        if status != "running":
            lifecycle.finish(session, lease, status, **fields)


def test_cancel_with_only_queued_members_ends_at_once(app, client, alice, model):
    batch = submit_batch(client, alice, model, n=3)
    response = client.post(f"/v1/batches/{batch['id']}/cancel", headers=alice.headers)
    assert response.status_code == 200
    assert response.json["status"] == "cancelled"
    assert response.json["request_counts"] == {"total": 3, "succeeded": 0, "failed": 0, "cancelled": 3}
    with sessions(app) as session:
        assert {j.status for j in session.scalars(select(Job))} == {"cancelled"}
    # a delivered message finds the job cancelled and does not run it
    with sessions(app) as session:
        assert lifecycle.claim(session, member_ids(app, batch["id"])[0], "late-worker", ttl=60) is None
    again = client.post(f"/v1/batches/{batch['id']}/cancel", headers=alice.headers)
    assert (again.status_code, again.json["error"]["code"]) == (409, "batch_finished")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_cancel_stops_running_members_then_ends(app, client, alice, model):
    batch = submit_batch(client, alice, model, n=3)
    first, second, third = member_ids(app, batch["id"])
    run(app, first, "succeeded")
    run(app, second, "running")
    response = client.post(f"/v1/batches/{batch['id']}/cancel", headers=alice.headers)
    assert response.json["status"] == "cancelling"
    assert response.json["request_counts"] == {"total": 3, "succeeded": 1, "failed": 0, "cancelled": 1}
    running = client.get(f"/v1/jobs/{second}", headers=alice.headers).json
    assert (running["status"], running["cancel_requested"]) == ("running", True)
    assert client.get(f"/v1/jobs/{third}", headers=alice.headers).json["status"] == "cancelled"
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=alice.headers).status_code == 200  # again: fine

    # the running member stops at its next step; its worker's notice ends the batch
    with sessions(app) as session:
        job = session.get(Job, second)
        lease = lifecycle.Lease(second, "test-worker", job.fencing_token)
        lifecycle.finish(session, lease, "cancelled")
    refresh_batch(app.extensions["palimpsest_db"].session_factory, batch["id"], app.extensions["celery"])
    final = client.get(f"/v1/batches/{batch['id']}", headers=alice.headers).json
    assert final["status"] == "cancelled" and final["finished_at"]
    assert final["request_counts"] == {"total": 3, "succeeded": 1, "failed": 0, "cancelled": 2}
    assert final["expires_at"] is None  # no retention by default

    # with retention, the batch says when it goes; its members go with it
    app.config["PALIMPSEST_RETENTION_SECONDS"] = 3600
    final = client.get(f"/v1/batches/{batch['id']}", headers=alice.headers).json
    assert parse_time(final["expires_at"]) - parse_time(final["finished_at"]) == timedelta(hours=1)
    assert client.get(f"/v1/jobs/{first}", headers=alice.headers).json["expires_at"] is None
    listed = client.get("/v1/batches", headers=alice.headers).json["batches"]
    assert [b["expires_at"] for b in listed if b["id"] == batch["id"]] == [final["expires_at"]]


def test_cancel_of_another_tenants_batch_is_404(app, client, alice, bob, model):
    batch = submit_batch(client, alice, model)
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=bob.headers).status_code == 404
    assert client.get(f"/v1/batches/{batch['id']}", headers=alice.headers).json["status"] == "in_progress"


def test_results_jsonl_in_file_order_with_artifacts_and_errors(app, client, alice, bob, model):
    batch = submit_batch(client, alice, model, n=4)
    first, second, third, fourth = member_ids(app, batch["id"])
    run(app, first, "succeeded")
    add_artifact(app, first, "preview", b"png bytes", "image/png")
    with sessions(app) as session:
        session.get(Job, first).metrics = {"constraint_loss": 0.5}
    run(app, second, "failed", error_code="unknown_layer", error_message="no layer9")
    run(app, third, "running")

    response = client.get(f"/v1/batches/{batch['id']}/results", headers=alice.headers)
    assert response.status_code == 200
    assert response.mimetype == "application/jsonl"
    lines = [json.loads(text) for text in response.get_data(as_text=True).splitlines()]
    assert [(r["custom_id"], r["job"], r["status"]) for r in lines] == [
        ("c0", first, "succeeded"), ("c1", second, "failed"), ("c2", third, "running"), ("c3", fourth, "queued")]
    assert lines[0]["metrics"] == {"constraint_loss": 0.5} and lines[0]["error"] is None
    (artifact,) = lines[0]["artifacts"]
    assert artifact["name"] == "preview" and artifact["url"].endswith(f"/v1/jobs/{first}/artifacts/preview")
    assert client.get(artifact["url"], headers=alice.headers).data == b"png bytes"
    assert lines[1]["error"] == {"code": "unknown_layer", "message": "no layer9"} and lines[1]["artifacts"] == []
    assert client.get(f"/v1/batches/{batch['id']}/results", headers=bob.headers).status_code == 404


def test_results_stream_every_member_across_pages(app, client, alice, model, monkeypatch):
    import api.batches

    monkeypatch.setattr(api.batches, "RESULTS_PAGE", 2)
    batch = submit_batch(client, alice, model, n=5)
    lines = client.get(f"/v1/batches/{batch['id']}/results", headers=alice.headers).get_data(as_text=True)
    assert [json.loads(t)["custom_id"] for t in lines.splitlines()] == [f"c{i}" for i in range(5)]


# -- webhook URLs: allow-listed hosts only, for jobs too ----------------------------------------

@pytest.mark.parametrize("url, status", [
    ("https://hooks.example.com/job", 202),
    ("http://hooks.example.com:8080/job", 202),
    ("https://other.example.com/job", 422),
    ("https://user:pw@hooks.example.com/job", 422),
    ("https://hooks.example.com\\@evil.org/", 422),
    ("http://127.0.0.1/job", 422),
])
def test_job_webhook_host_must_be_allowed(client, alice, model, url, status):
    response = client.post("/v1/jobs", json={"model": model, "layer": "layer3", "request": EDIT, "webhook": url},
                           headers=alice.headers)
    assert response.status_code == status, response.json
    if status == 422:
        assert response.json["error"]["field"] == "webhook"


def test_empty_allow_list_allows_no_webhook(config, alice):
    app = create_app({**config, "PALIMPSEST_WEBHOOK_ALLOWED_HOSTS": ()})
    with session_scope(app.extensions["palimpsest_db"].session_factory) as session:
        key, _ = create_key(session, "t")
    model = add_model(app, None)
    response = app.test_client().post("/v1/jobs", json={"model": model, "layer": "layer3", "request": EDIT,
                                                        "webhook": "https://hooks.example.com/x"},
                                      headers={"Authorization": f"Bearer {key}"})
    assert (response.status_code, response.json["error"]["field"]) == (422, "webhook")
    assert "empty" in response.json["error"]["message"]


def test_batch_cancel_queues_the_batch_webhook_once(app, client, alice, model):
    batch = submit_batch(client, alice, model, n=2, query="?webhook=https://hooks.example.com/b")
    client.post(f"/v1/batches/{batch['id']}/cancel", headers=alice.headers)
    with sessions(app) as session:
        (delivery,) = session.scalars(select(WebhookDelivery))
        assert (delivery.event, delivery.subject_id, delivery.url, delivery.status) == (
            "batch.completed", batch["id"], "https://hooks.example.com/b", "pending")
    assert ("cpu", "workers.webhooks.deliver_webhook", [delivery.id]) in [m[:3] for m in queued(app)]


# -- a merged batch's merges ----------------------------------------------------------------------

def test_merged_batch_shows_its_merges_with_download_links(app, client, alice, bob, model):
    import hashlib

    from storage.models import BatchMerge

    batch = submit_batch(client, alice, model, n=2, query="?merge=true")
    report = b'{"rules": []}'
    sha256 = hashlib.sha256(report).hexdigest()
    key = f"tenants/{alice.id}/merge_report/{sha256}/merge_report.json"
    app.extensions["palimpsest_store"].put(key, io.BytesIO(report), content_type="application/json")
    with sessions(app) as session:
        row = BatchMerge(batch_id=batch["id"], model_id=model, model_sha256="0" * 64, layer="layer3",
                         status="succeeded", rules=2, rank=5, report={"rules": []}, report_object_key=key,
                         report_sha256=sha256)
        session.add(row)
        session.flush()
        merge_id = row.id
    shown = client.get(f"/v1/batches/{batch['id']}", headers=alice.headers).json
    (merge,) = shown["merges"]
    assert (merge["id"], merge["status"], merge["rules"], merge["rank"], merge["error"]) == (
        merge_id, "succeeded", 2, 5, None)
    (artifact,) = merge["artifacts"]  # only the files it has
    assert artifact["name"] == "report" and artifact["sha256"] == sha256
    download = client.get(artifact["url"], headers=alice.headers)
    assert download.status_code == 200 and download.data == report
    assert download.headers["ETag"] == f'"{sha256}"'
    assert client.get(artifact["url"], headers=bob.headers).status_code == 404
    for name in ("delta", "nope"):
        missing = client.get(f"/v1/batches/{batch['id']}/merges/{merge_id}/{name}", headers=alice.headers)
        assert (missing.status_code, missing.json["error"]["code"]) == (404, "artifact_not_found")
    assert client.get(f"/v1/batches/{batch['id']}/merges/bmg_nope/report", headers=alice.headers).status_code == 404
