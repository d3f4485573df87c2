"""POST/GET /v1/jobs: validation before queueing, idempotency, cursor pages, cancel,
events and the job's shape. The broker is the embedded SQL one: a submitted job is
really a message in the ``gpu`` queue (read back from the broker's tables)."""
import base64
import io
import threading

import pytest
from PIL import Image
from sqlalchemy import func, select, update

from api import create_app
from api.auth import create_key
from storage import lifecycle
from storage.db import session_scope
from storage.models import Job, Model, utcnow
from v1_helpers import EDIT, LAYERS, add_job, add_model, alice, app, bob, client, config, queued, sessions  # noqa: F401


def png_url(box=(2, 2, 6, 6), size=(8, 8)) -> str:
    image = Image.new("L", size, 0)
    image.paste(255, box)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.fixture
def model(app):
    return add_model(app, None)  # shared, like the demo


def submit(client, tenant, body, **headers):
    return client.post("/v1/jobs", json=body, headers={**tenant.headers, **headers})


def count_jobs(app) -> int:
    with sessions(app) as session:
        return session.scalar(select(func.count()).select_from(Job))


# -- validation: payload -> status, code, field ----------------------------------------------

def with_request(**changes):
    return {"request": {**EDIT, **changes}}


INVALID = [
    # (id, change to a valid body (None drops the field), status, code, field)
    ("no-model", {"model": None}, 422, "validation_error", "model"),
    ("model-not-string", {"model": 7}, 422, "validation_error", "model"),
    ("unknown-model", {"model": "mdl_nope"}, 422, "validation_error", "model"),
    ("pending-model", {"model": "@pending"}, 409, "model_not_ready", "model"),
    ("failed-model", {"model": "@failed-model"}, 409, "model_not_ready", "model"),
    ("no-request", {"request": None}, 422, "invalid_request", "request"),
    ("request-not-object", {"request": "dome"}, 422, "invalid_request", "request"),
    ("empty-box", with_request(paste={"seed": 2, "mask": [0.5, 0.5, 0.1, 0.1]}), 422, "invalid_request",
     "request.paste.mask"),
    ("bad-png", with_request(paste={"seed": 2, "mask": "data:image/png;base64,AAAA"}), 422, "invalid_request",
     "request.paste.mask"),
    ("empty-png", with_request(paste={"seed": 2, "mask": png_url(box=(0, 0, 0, 0))}), 422, "invalid_request",
     "request.paste.mask"),
    ("negative-seed", with_request(copy={"seed": -1, "mask": [0, 0, 1, 1]}), 422, "invalid_request",
     "request.copy.seed"),
    ("copy-missing", {"request": {"operation": "copy", "paste": EDIT["paste"]}}, 422, "invalid_request",
     "request.copy"),
    ("unknown-request-field", with_request(colour="red"), 422, "invalid_request", "request.colour"),
    ("original-format-bad-mask", {"request": {"object": [1, [0, 0, 1, 1]], "paste": [2, "blue"]}}, 422,
     "invalid_request", "request.paste.mask"),
    ("request-params-rank", with_request(params={"rank": 0}), 422, "invalid_request", "request.params.rank"),
    ("params-not-object", {"params": [1]}, 422, "invalid_request", "params"),
    ("params-unknown", {"params": {"speed": 3}}, 422, "invalid_request", "params.speed"),
    ("params-rank-zero", {"params": {"rank": 0}}, 422, "invalid_request", "params.rank"),
    ("params-rank-word", {"params": {"rank": "all"}}, 422, "invalid_request", "params.rank"),
    ("params-lr-string", {"params": {"lr": "fast"}}, 422, "invalid_request", "params.lr"),
    ("params-method", {"params": {"method": "magic"}}, 422, "invalid_request", "params.method"),
    ("params-samples", {"params": {"samples": 0}}, 422, "invalid_request", "params.samples"),
    # layer3 keys are 8x8; the paste box covers 4x4 cells: 16 context keys
    ("rank-above-keys", {"params": {"rank": 17}}, 422, "invalid_request", "params.rank"),
    # layer4 has 4 key channels
    ("rank-above-channels", {"layer": "layer4", "params": {"rank": 5}}, 422, "invalid_request", "params.rank"),
    # a linear layer has one key per context image
    ("rank-linear", {"layer": "fc", "params": {"rank": 2}}, 422, "invalid_request", "params.rank"),
    ("no-layer", {"layer": None}, 422, "validation_error", "layer"),
    ("unknown-layer", {"layer": "layer9"}, 422, "unknown_layer", "layer"),
    ("layers-disagree", {"layer": "layer3", **with_request(layer="layer4")}, 422, "invalid_request", "request.layer"),
    ("priority-low", {"priority": -1}, 422, "validation_error", "priority"),
    ("priority-high", {"priority": 10}, 422, "validation_error", "priority"),
    ("priority-string", {"priority": "high"}, 422, "validation_error", "priority"),
    ("priority-bool", {"priority": True}, 422, "validation_error", "priority"),
    ("webhook-scheme", {"webhook": "ftp://example.com/x"}, 422, "validation_error", "webhook"),
    ("webhook-no-host", {"webhook": "https:///x"}, 422, "validation_error", "webhook"),
    ("webhook-not-string", {"webhook": 5}, 422, "validation_error", "webhook"),
    ("webhook-too-long", {"webhook": "https://example.com/" + "x" * 2048}, 422, "validation_error", "webhook"),
    ("base-not-object", {"base": "job_1"}, 422, "validation_error", "base"),
    ("base-extra", {"base": {"job": "job_1", "layer": "x"}}, 422, "validation_error", "base"),
    ("base-unknown", {"base": {"job": "job_nope"}}, 422, "validation_error", "base.job"),
    ("base-queued", {"base": {"job": "@queued"}}, 422, "validation_error", "base.job"),
    ("base-failed", {"base": {"job": "@failed-job"}}, 422, "validation_error", "base.job"),
    ("base-other-model", {"base": {"job": "@other-model"}}, 422, "validation_error", "base.job"),
    ("unknown-field", {"colour": "red"}, 422, "validation_error", "colour"),
]


@pytest.mark.parametrize("change, status, code, field", [case[1:] for case in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_submissions_name_the_field_and_queue_nothing(app, client, alice, model, change, status, code, field):
    refs = {
        "@pending": add_model(app, alice.id, status="pending", layers=[]),
        "@failed-model": add_model(app, alice.id, status="failed", layers=[]),
        "@queued": add_job(app, alice.id, model, "queued"),
        "@failed-job": add_job(app, alice.id, model, "failed"),
        "@other-model": add_job(app, alice.id, add_model(app, alice.id), "succeeded"),
    }
    jobs_before = count_jobs(app)
    body = {"model": model, "layer": "layer3", "request": EDIT}
    for key, value in change.items():
        if value is None:
            body.pop(key, None)
        elif key == "model" and value in refs:
            body[key] = refs[value]
        elif key == "base" and isinstance(value, dict) and value.get("job") in refs:
            body[key] = {"job": refs[value["job"]]}
        else:
            body[key] = value
    response = submit(client, alice, body)
    assert response.status_code == status, response.json
    assert response.json["error"]["code"] == code
    assert response.json["error"]["field"] == field
    assert response.json["error"]["message"]
    assert count_jobs(app) == jobs_before
    assert queued(app) == []


def test_unknown_layer_lists_the_valid_names(client, alice, model):
    response = submit(client, alice, {"model": model, "layer": "layer9", "request": EDIT})
    message = response.json["error"]["message"]
    assert all(info["name"] in message for info in LAYERS)


@pytest.mark.parametrize("data, content_type", [
    (b"{not json", "application/json"),
    (b"[1, 2]", "application/json"),
    (b"model=x", "application/x-www-form-urlencoded"),
])
def test_unreadable_body_is_400(client, alice, data, content_type):
    response = client.post("/v1/jobs", data=data, content_type=content_type, headers=alice.headers)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "bad_request"


@pytest.mark.parametrize("body", [
    {"layer": "layer3", "request": EDIT},  # native
    {"request": {**EDIT, "layer": "layer3"}},  # layer inside the request
    {"layer": "layer3", "request": {"object": [1, [0.1, 0.1, 0.5, 0.5]], "paste": [2, png_url()],
                                    "key": [[3, [0, 0, 1, 1]]]}},  # the original app's format
    {"layer": "layer3", "request": {"operation": "erase", "paste": {"seed": 4, "mask": png_url()}},
     "params": {"rank": 2, "steps": 10, "samples": 100}},
    {"layer": "fc", "request": EDIT, "params": {"rank": 1}},
    # every key direction, whatever the number of context keys (16 here)
    {"layer": "layer3", "request": EDIT, "params": {"rank": "full", "method": "closed_form", "halo": True}},
])
def test_valid_submission_is_queued_once_on_gpu(app, client, alice, model, body):
    response = submit(client, alice, {"model": model, **body})
    assert response.status_code == 202, response.json
    job = response.json
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["model"] == model and job["layer"] == body.get("layer", "layer3")
    assert queued(app) == [("gpu", "workers.jobs.run_job", [job["id"]], 9 - 5)]
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice.headers).json == job


def test_job_stores_the_request_and_params_it_was_validated_with(app, client, alice, model):
    body = {"model": model, "layer": "layer3", "request": {**EDIT, "params": {"lr": 0.1}},
            "params": {"rank": 2, "samples": 300}, "priority": 9, "webhook": "https://example.com/hook"}
    job = submit(client, alice, body).json
    assert job["params"]["rank"] == 2 and job["params"]["lr"] == 0.1 and job["params"]["samples"] == 300
    assert job["priority"] == 9 and job["webhook"] == "https://example.com/hook"
    assert queued(app)[0][3] == 0  # the broker serves priority 0 first
    with sessions(app) as session:
        row = session.get(Job, job["id"])
        assert row.request["paste"] == EDIT["paste"] and row.request["layer"] == "layer3"
        assert row.params == job["params"]
        assert row.idempotency_key is None


def test_chained_job_records_its_base(app, client, alice, model):
    base = add_job(app, alice.id, model, "succeeded")
    job = submit(client, alice, {"model": model, "layer": "layer4", "request": EDIT, "base": {"job": base}}).json
    assert job["base_job"] == base


def test_an_ended_job_says_when_retention_deletes_it(app, client, alice, model):
    from datetime import datetime, timedelta

    ended, queued = add_job(app, alice.id, model, "succeeded"), add_job(app, alice.id, model)
    assert client.get(f"/v1/jobs/{ended}", headers=alice.headers).json["expires_at"] is None  # no retention
    app.config["PALIMPSEST_RETENTION_SECONDS"] = 86400
    job = client.get(f"/v1/jobs/{ended}", headers=alice.headers).json
    expires = datetime.fromisoformat(job["expires_at"])
    assert expires - datetime.fromisoformat(job["finished_at"]) == timedelta(days=1)
    assert client.get(f"/v1/jobs/{queued}", headers=alice.headers).json["expires_at"] is None  # not ended
    listed = {j["id"]: j["expires_at"] for j in client.get("/v1/jobs", headers=alice.headers).json["jobs"]}
    assert listed[ended] == job["expires_at"] and listed[queued] is None

def test_job_shape(app, client, alice, model):
    job_id = add_job(app, alice.id, model, "failed")
    job = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json
    assert set(job) == {"id", "status", "model", "layer", "progress", "created_at", "started_at", "finished_at",
                        "expires_at", "error", "metrics", "artifacts", "base_job", "priority", "batch", "params", "webhook",
                        "cancel_requested"}
    assert set(job["progress"]) == {"phase", "step", "total", "loss"}
    assert job["error"] == {"code": "boom", "message": "it broke"}
    assert job["status"] == "failed" and job["started_at"] and job["finished_at"]


# -- idempotency -------------------------------------------------------------------------------

def test_same_key_same_body_is_the_same_job(app, client, alice, model):
    body = {"model": model, "layer": "layer3", "request": EDIT}
    first = submit(client, alice, body, **{"Idempotency-Key": "k1"})
    again = submit(client, alice, dict(reversed(body.items())), **{"Idempotency-Key": "k1"})  # key order is no matter
    assert first.status_code == 202 and again.status_code == 200
    assert again.json["id"] == first.json["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert len(queued(app)) == 1 and count_jobs(app) == 1


def test_same_key_other_body_is_422(app, client, alice, model):
    body = {"model": model, "layer": "layer3", "request": EDIT}
    first = submit(client, alice, body, **{"Idempotency-Key": "k1"})
    other = submit(client, alice, {**body, "priority": 7}, **{"Idempotency-Key": "k1"})
    assert other.status_code == 422
    assert other.json["error"]["code"] == "idempotency_mismatch"
    assert other.json["error"]["field"] == "Idempotency-Key"
    assert first.json["id"] in other.json["error"]["message"]
    assert count_jobs(app) == 1


def test_keys_are_per_tenant_and_per_key(app, client, alice, bob, model):
    body = {"model": model, "layer": "layer3", "request": EDIT}
    a1 = submit(client, alice, body, **{"Idempotency-Key": "k1"}).json["id"]
    a2 = submit(client, alice, body, **{"Idempotency-Key": "k2"}).json["id"]
    b1 = submit(client, bob, body, **{"Idempotency-Key": "k1"}).json["id"]
    plain = submit(client, alice, body).json["id"]
    assert len({a1, a2, b1, plain}) == 4


@pytest.mark.parametrize("key", ["", "x" * 201, "tab\there"])
def test_bad_idempotency_key_is_422(client, alice, model, key):
    response = submit(client, alice, {"model": model, "layer": "layer3", "request": EDIT}, **{"Idempotency-Key": key})
    assert response.status_code == 422
    assert response.json["error"]["field"] == "Idempotency-Key"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database_app(request, config):
    url = config["PALIMPSEST_DATABASE_URL"] if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    return create_app({**config, "PALIMPSEST_DATABASE_URL": url})


def test_concurrent_duplicates_make_one_job(any_database_app):
    app = any_database_app
    with session_scope(app.extensions["palimpsest_db"].session_factory) as session:
        key, row = create_key(session, "racer")
    model = add_model(app, None)
    body = {"model": model, "layer": "layer3", "request": EDIT}
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "same"}
    barrier = threading.Barrier(8)
    results = []

    def post():
        client = app.test_client()
        barrier.wait()
        response = client.post("/v1/jobs", json=body, headers=headers)
        results.append((response.status_code, response.json["id"]))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert len({job_id for _, job_id in results}) == 1
    assert sorted(status for status, _ in results).count(202) == 1  # the others replayed it (200)
    with sessions(app) as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == row.tenant_id)) == 1
    assert [m[2] for m in queued(app)] == [[results[0][1]]]


# -- cancel ------------------------------------------------------------------------------------

def test_cancel_queued_job_never_runs(app, client, alice, model):
    job_id = submit(client, alice, {"model": model, "layer": "layer3", "request": EDIT}).json["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers)
    assert response.status_code == 200
    assert response.json["status"] == "cancelled" and response.json["finished_at"]
    # the message is still in the queue: a worker receiving it must not run the job
    assert [m[2] for m in queued(app)] == [[job_id]]
    with sessions(app) as session:
        assert lifecycle.claim(session, job_id, "late-worker", ttl=60) is None
    assert client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json["status"] == "cancelled"


def test_cancel_running_job_asks_it_to_stop(app, client, alice, model):
    job_id = add_job(app, alice.id, model, "running")
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers)
    assert response.status_code == 200
    assert response.json["status"] == "running" and response.json["cancel_requested"] is True
    events = client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).json["events"]
    assert events[-1]["message"] == "cancel requested"


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_cancel_finished_job_is_409(app, client, alice, model, status):
    job_id = add_job(app, alice.id, model, status)
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers)
    assert response.status_code == 409
    assert response.json["error"]["code"] == "job_finished"
    assert client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json["status"] == status


# -- events ------------------------------------------------------------------------------------

def test_events_in_seq_order(app, client, alice, model):
    job_id = add_job(app, alice.id, model, "queued")
    with sessions(app) as session:
        lease = lifecycle.claim(session, job_id, "w", ttl=60)
    with sessions(app) as session:
        lifecycle.report_progress(session, lease, "statistics", 1, 10, milestone=True)
        lifecycle.report_progress(session, lease, "optimizing", 5, 100, loss=0.25, milestone=True)
    with sessions(app) as session:
        lifecycle.finish(session, lease, "succeeded", metrics={"constraint_loss": 0.1})
    events = client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).json["events"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert [(e["kind"], e["status"], e["phase"]) for e in events] == [
        ("transition", "queued", None), ("transition", "running", "loading"), ("progress", "running", "statistics"),
        ("progress", "running", "optimizing"), ("transition", "succeeded", None)]
    assert events[3]["loss"] == 0.25 and events[3]["step"] == 5 and events[3]["total"] == 100
    later = client.get(f"/v1/jobs/{job_id}/events?after=3", headers=alice.headers).json["events"]
    assert [e["seq"] for e in later] == [4, 5]
    job = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json
    assert job["metrics"] == {"constraint_loss": 0.1}
    assert job["progress"] == {"phase": "optimizing", "step": 5, "total": 100, "loss": 0.25}
    assert client.get(f"/v1/jobs/{job_id}/events?after=x", headers=alice.headers).status_code == 422


# -- list and pages ----------------------------------------------------------------------------

def test_pages_walk_every_job_exactly_once(app, client, alice, bob, model):
    other = add_model(app, alice.id)
    ids = [add_job(app, alice.id, model if i % 3 else other) for i in range(23)]
    add_job(app, bob.id, model)
    # several jobs share one created_at: the cursor must break ties by id
    with sessions(app) as session:
        same = utcnow()
        for job_id in ids[5:12]:
            session.get(Job, job_id).created_at = same
    seen, cursor, pages = [], None, 0
    while True:
        url = "/v1/jobs?limit=4" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=alice.headers).json
        pages += 1
        assert len(page["jobs"]) <= 4
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 6
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    with sessions(app) as session:
        order = [j.id for j in session.scalars(select(Job).where(Job.tenant_id == alice.id)
                                               .order_by(Job.created_at.desc(), Job.id.desc()))]
    assert seen == order


def test_filters(app, client, alice, model):
    other = add_model(app, alice.id)
    queued_job = add_job(app, alice.id, model)
    done = add_job(app, alice.id, other, "succeeded")

    def ids(query):
        response = client.get(f"/v1/jobs?{query}", headers=alice.headers)
        assert response.status_code == 200, response.json
        return {job["id"] for job in response.json["jobs"]}

    assert ids("") == {queued_job, done}
    assert ids("status=queued") == {queued_job}
    assert ids("status=succeeded") == {done}
    assert ids(f"model={other}") == {done}
    assert ids(f"model={model}&status=succeeded") == set()
    assert ids("batch=bat_nope") == set()


@pytest.mark.parametrize("query, field", [
    ("limit=0", "limit"), ("limit=101", "limit"), ("limit=ten", "limit"), ("limit=-1", "limit"),
    ("limit=" + "9" * 5000, "limit"),  # past int()'s 4,300 digits
    ("cursor=garbage", "cursor"), ("cursor=" + base64.urlsafe_b64encode(b'["2020-01-01", 3]').decode(), "cursor"),
    # out of range once in UTC; a lone surrogate no database can compare
    ("cursor=" + base64.urlsafe_b64encode(b'["0001-01-01T00:00:00+14:00", "x"]').decode(), "cursor"),
    ("cursor=" + base64.urlsafe_b64encode(b'["2020-01-01T00:00:00+00:00", "\\ud800"]').decode(), "cursor"),
    ("status=done", "status"), ("colour=red", "colour"),
])
def test_bad_list_queries_are_422(client, alice, query, field):
    response = client.get(f"/v1/jobs?{query}", headers=alice.headers)
    assert response.status_code == 422
    assert response.json["error"]["field"] == field


def test_limit_100_is_allowed(client, alice):
    assert client.get("/v1/jobs?limit=100", headers=alice.headers).status_code == 200


# -- the broker is down ------------------------------------------------------------------------

def test_unqueueable_job_fails_and_answers_503(config, tmp_path):
    from stack import free_port

    app = create_app({**config, "PALIMPSEST_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    app.extensions["celery"].conf.broker_connection_max_retries = 0
    app.extensions["celery"].conf.task_publish_retry = False
    with session_scope(app.extensions["palimpsest_db"].session_factory) as session:
        key, _ = create_key(session, "t")
    model = add_model(app, None)
    response = app.test_client().post("/v1/jobs", json={"model": model, "layer": "layer3", "request": EDIT},
                                      headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 503
    with sessions(app) as session:
        job = session.scalars(select(Job)).one()
        assert job.status == "failed" and job.error_code == "queue_unavailable"

    # the retry the 503 invites, under the same Idempotency-Key, is a new submission (not a
    # replay of the failed job): it is queued once the broker is back
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "k1"}
    body = {"model": model, "layer": "layer3", "request": EDIT}
    assert app.test_client().post("/v1/jobs", json=body, headers=headers).status_code == 503
    up = create_app({**config})
    retried = up.test_client().post("/v1/jobs", json=body, headers=headers)
    assert retried.status_code == 202 and "Idempotent-Replayed" not in retried.headers
    with sessions(up) as session:
        assert {j.status for j in session.scalars(select(Job))} == {"failed", "queued"}


def test_body_over_16_mib_is_413(client, alice, model):
    huge = {"model": model, "layer": "layer3", "request": {**EDIT, "note": "x" * (16 * 1024 * 1024)}}
    response = submit(client, alice, huge)
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"


def test_ready_models_are_cached_and_only_ready_ones(app, client, alice, bob):
    """The API keeps ready models in memory (a ready row never changes): a model that was
    pending is looked up again once ready, and a cached model stays another tenant's."""
    pending = add_model(app, alice.id, status="pending")
    body = {"model": pending, "layer": "layer3", "request": EDIT}
    assert submit(client, alice, body).status_code == 409
    with sessions(app) as session:
        session.execute(update(Model).where(Model.id == pending).values(status="ready"))
    assert submit(client, alice, body).status_code == 202
    assert pending in app.extensions["palimpsest_ready_models"]
    # cached now: bob still cannot see alice's model, and alice's jobs need no model query
    answer = submit(client, bob, body)
    assert answer.status_code == 422 and answer.json["error"]["field"] == "model"
    with sessions(app) as session:  # a ready row never changes; if it did, the cache would not see it
        session.execute(update(Model).where(Model.id == pending).values(layers=[]))
    assert submit(client, alice, body).status_code == 202
