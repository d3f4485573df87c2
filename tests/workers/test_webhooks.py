"""Webhooks: the allow-list, HMAC signatures a receiver can verify, and delivery to a real
HTTP server on 127.0.0.1 (retries with backoff on 5xx, no redirects followed, a host off
the list never contacted), then once through a real worker's Celery retries."""
import json
import secrets
import time

import pytest
from sqlalchemy import select

from palimpsest.config import load_settings
from palimpsest.webhooks import InvalidSignature, sign, url_problem, verify
from storage import lifecycle
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Artifact, Batch, Job, Model, Tenant, WebhookDelivery
from webhook_receiver import Receiver
from workers.batches import queue_webhook
from storage.resources import job_json as notice_json
from workers.webhooks import MAX_BACKOFF_SECONDS, backoff, deliver

SECRET = "test-secret"


# -- the allow-list ----------------------------------------------------------------------

@pytest.mark.parametrize("url, allowed, ok", [
    ("https://hooks.example.com/x", ["hooks.example.com"], True),
    ("https://HOOKS.example.com:8443/x?y=1", ["hooks.example.com"], True),
    ("http://127.0.0.1:9000/hook", ["127.0.0.1"], True),
    ("http://[::1]:9000/hook", ["::1"], True),
    ("https://a.hooks.example.com/x", ["*.hooks.example.com"], True),
    ("https://hooks.example.com/x", ["*.hooks.example.com"], False),  # the wildcard is for subdomains
    ("https://evilhooks.example.com/x", ["*.hooks.example.com"], False),
    ("https://hooks.example.com.evil.org/x", ["hooks.example.com"], False),
    ("https://hooks.example.com/x", [], False),  # empty: none allowed
    ("https://other.example.com/x", ["hooks.example.com"], False),
    ("ftp://hooks.example.com/x", ["hooks.example.com"], False),
    ("https://user:pw@hooks.example.com/x", ["hooks.example.com"], False),
    ("https://evil.org\\@hooks.example.com/", ["hooks.example.com"], False),
    ("https://hooks.example.com /x", ["hooks.example.com"], False),
    ("https:///x", ["hooks.example.com"], False),
    ("https://hooks.example.com:99999/x", ["hooks.example.com"], False),
    ("https://hooks.example.com/" + "x" * 2048, ["hooks.example.com"], False),
    (5, ["hooks.example.com"], False),
])
def test_url_allow_list(url, allowed, ok):
    problem = url_problem(url, allowed)
    assert (problem is None) == ok, problem


def test_settings_refuse_an_allow_list_without_a_secret():
    with pytest.raises(ValueError, match="PALIMPSEST_WEBHOOK_SECRET"):
        load_settings({"PALIMPSEST_WEBHOOK_ALLOWED_HOSTS": "hooks.example.com"})
    settings = load_settings({"PALIMPSEST_WEBHOOK_ALLOWED_HOSTS": " Hooks.Example.com, 127.0.0.1 ,",
                              "PALIMPSEST_WEBHOOK_SECRET": "s"})
    assert settings.webhook_allowed_hosts == ("hooks.example.com", "127.0.0.1")
    assert load_settings({}).webhook_allowed_hosts == ()


# -- signatures --------------------------------------------------------------------------

def test_signature_verifies_and_catches_tampering_and_replays():
    body = b'{"type":"job.completed"}'
    header = sign(SECRET, body, timestamp=1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify(SECRET, header, body, now=1_700_000_100) == 1_700_000_000
    for bad_secret, bad_body, now in [("other", body, 1_700_000_000), (SECRET, body + b" ", 1_700_000_000),
                                      (SECRET, body, 1_700_000_000 + 301)]:
        with pytest.raises(InvalidSignature):
            verify(bad_secret, header, bad_body, now=now)
    with pytest.raises(InvalidSignature):
        verify(SECRET, "v1=abc", body)


def test_backoff_doubles_up_to_a_cap():
    settings = load_settings({}, webhook_retry_seconds=10)
    assert [backoff(settings, n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff(settings, 30) == MAX_BACKOFF_SECONDS


# -- deliveries to a real server -----------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgres"])
def session_factory(request):
    engine = make_engine(request.getfixturevalue(f"{request.param}_url"))
    yield make_session_factory(engine)
    engine.dispose()


def settings_for(tmp_path, hosts=("127.0.0.1",), **overrides):
    return load_settings({"PALIMPSEST_DATA_DIR": str(tmp_path)}, webhook_allowed_hosts=tuple(hosts),
                         webhook_secret=SECRET, webhook_retry_seconds=1, webhook_max_attempts=4, **overrides)


def finished_job(session_factory, url) -> tuple[str, str]:
    """A succeeded job with an artifact, and its queued job.completed delivery: (job id, delivery id)."""
    with session_scope(session_factory) as session:
        tenant = Tenant(name=f"acme-{secrets.token_hex(4)}")
        session.add(tenant)
        session.flush()
        model = Model(tenant_id=tenant.id, name="m", architecture="demo-gan", sha256="0" * 64, size=1,
                      object_key="k", layers=[], status="ready")
        session.add(model)
        session.flush()
        job = lifecycle.create_job(session, tenant_id=tenant.id, model_id=model.id, layer="layer3", request={},
                                   params={}, webhook_url=url)
        job_id = job.id
    with session_scope(session_factory) as session:
        lease = lifecycle.claim(session, job_id, "w", ttl=60)
        session.add(Artifact(job_id=job_id, name="preview", object_key="p", sha256="a" * 64, size=3,
                             content_type="image/png"))
        lifecycle.finish(session, lease, "succeeded", metrics={"constraint_loss": 0.25})
        delivery_id = queue_webhook(session, job.tenant_id, "job.completed", job_id, url)
    return job_id, delivery_id


def delivery(session_factory, delivery_id) -> WebhookDelivery:
    with session_scope(session_factory) as session:
        return session.get(WebhookDelivery, delivery_id)


def test_delivery_is_signed_and_carries_the_job(session_factory, tmp_path):
    with Receiver([204]) as receiver:
        job_id, delivery_id = finished_job(session_factory, receiver.url + "/hooks/job?x=1")
        outcome = deliver(session_factory, settings_for(tmp_path), delivery_id)
        (request,) = receiver.requests
    assert (outcome.status, outcome.status_code) == ("delivered", 204)
    assert request.path == "/hooks/job?x=1"
    verify(SECRET, request.headers["Palimpsest-Signature"], request.body)  # what a receiver does
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Palimpsest-Delivery"] == delivery_id
    notice = json.loads(request.body)
    assert (notice["id"], notice["type"]) == (delivery_id, "job.completed")
    data = notice["data"]
    assert (data["id"], data["status"], data["metrics"]) == (job_id, "succeeded", {"constraint_loss": 0.25})
    assert data["artifacts"][0]["url"] == f"/v1/jobs/{job_id}/artifacts/preview"
    row = delivery(session_factory, delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 1, 204)
    assert row.delivered_at is not None
    # a second delivery of the same message sends nothing
    assert deliver(session_factory, settings_for(tmp_path), delivery_id).status == "delivered"
    assert len(receiver.requests) == 1


def test_5xx_is_retried_with_backoff_then_delivered(session_factory, tmp_path):
    settings = settings_for(tmp_path)
    with Receiver([500, 503, 200]) as receiver:
        _, delivery_id = finished_job(session_factory, receiver.url)
        outcomes = [deliver(session_factory, settings, delivery_id) for _ in range(3)]
    assert [(o.status, o.retry_in, o.status_code) for o in outcomes] == [
        ("pending", 1, 500), ("pending", 2, 503), ("delivered", None, 200)]
    row = delivery(session_factory, delivery_id)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("delivered", 3, 200, None)
    bodies = {r.body for r in receiver.requests}
    assert len(receiver.requests) == 3 and len(bodies) == 1  # the same notice each time


def test_attempts_are_bounded(session_factory, tmp_path):
    settings = settings_for(tmp_path)  # 4 attempts
    with Receiver([500]) as receiver:
        _, delivery_id = finished_job(session_factory, receiver.url)
        outcomes = [deliver(session_factory, settings, delivery_id) for _ in range(6)]
    assert [o.status for o in outcomes] == ["pending", "pending", "pending", "failed", "failed", "failed"]
    assert len(receiver.requests) == 4
    row = delivery(session_factory, delivery_id)
    assert (row.status, row.attempts, row.last_error) == ("failed", 4, "HTTP 500")


def test_a_client_error_is_not_retried(session_factory, tmp_path):
    with Receiver([404]) as receiver:
        _, delivery_id = finished_job(session_factory, receiver.url)
        outcome = deliver(session_factory, settings_for(tmp_path), delivery_id)
    assert (outcome.status, outcome.retry_in) == ("failed", None)
    assert len(receiver.requests) == 1


def test_redirects_are_not_followed(session_factory, tmp_path):
    with Receiver([200]) as elsewhere, Receiver([(302, {"Location": None})]) as receiver:
        receiver.answers = [(302, {"Location": elsewhere.url + "/stolen"})]
        _, delivery_id = finished_job(session_factory, receiver.url)
        outcome = deliver(session_factory, settings_for(tmp_path), delivery_id)
    assert outcome.status == "failed"
    assert len(receiver.requests) == 1 and elsewhere.requests == []
    assert "redirects are not followed" in delivery(session_factory, delivery_id).last_error


def test_a_host_off_the_list_is_never_contacted(session_factory, tmp_path):
    """The API accepted the URL, then the allow-list changed: the sender checks again."""
    with Receiver([200]) as receiver:
        _, delivery_id = finished_job(session_factory, receiver.url)
        outcome = deliver(session_factory, settings_for(tmp_path, hosts=("hooks.example.com",)), delivery_id)
        also = deliver(session_factory, settings_for(tmp_path, hosts=()), delivery_id)
    assert (outcome.status, also.status) == ("refused", "refused")
    assert receiver.requests == []
    row = delivery(session_factory, delivery_id)
    assert (row.status, row.attempts) == ("refused", 0)
    assert "allow-list" in row.last_error


def test_an_unreachable_receiver_is_retried(session_factory, tmp_path):
    from stack import free_port

    _, delivery_id = finished_job(session_factory, f"http://127.0.0.1:{free_port()}/hook")
    outcome = deliver(session_factory, settings_for(tmp_path), delivery_id)
    assert (outcome.status, outcome.retry_in) == ("pending", 1)
    assert "ConnectionError" in delivery(session_factory, delivery_id).last_error


def test_the_batch_notice_carries_the_batch(session_factory, tmp_path):
    with Receiver([200]) as receiver:
        with session_scope(session_factory) as session:
            tenant = Tenant(name=f"acme-{secrets.token_hex(4)}")
            session.add(tenant)
            session.flush()
            batch = Batch(tenant_id=tenant.id, status="completed", total_count=2, succeeded_count=1,
                          failed_count=1, webhook_url=receiver.url)
            session.add(batch)
            session.flush()
            delivery_id = queue_webhook(session, tenant.id, "batch.completed", batch.id, batch.webhook_url)
        assert deliver(session_factory, settings_for(tmp_path), delivery_id).status == "delivered"
        notice = json.loads(receiver.requests[0].body)
    assert notice["type"] == "batch.completed"
    assert notice["data"]["id"] == batch.id and notice["data"]["status"] == "completed"
    assert notice["data"]["request_counts"] == {"total": 2, "succeeded": 1, "failed": 1, "cancelled": 0}


def test_job_notice_has_the_fields_of_the_api_job(sqlite_url, tmp_path):
    """A job's notice (storage.resources.job_json, relative artifact URLs) is the API's job
    (api.jobs.job_json, which asks Flask for absolute ones)."""
    from api import create_app
    from api.jobs import job_json
    from stack import embedded_stack

    app = create_app({**embedded_stack(tmp_path).settings.as_flask_config(), "PALIMPSEST_DATABASE_URL": sqlite_url})
    session_factory = app.extensions["palimpsest_db"].session_factory
    job_id, _ = finished_job(session_factory, None)
    with session_scope(session_factory) as session, app.test_request_context():
        job = session.get(Job, job_id)
        artifacts = list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)))
        api_view, notice = job_json(job, artifacts), notice_json(job, artifacts)
    assert notice.keys() == api_view.keys()
    assert [a.keys() for a in notice["artifacts"]] == [a.keys() for a in api_view["artifacts"]]
    assert {k: v for k, v in notice.items() if k != "artifacts"} == {k: v for k, v in api_view.items()
                                                                     if k != "artifacts"}
    assert api_view["artifacts"][0]["url"].endswith(notice["artifacts"][0]["url"])


# -- through a real worker: Celery retries with the backoff -----------------------------------

def test_worker_retries_with_backoff_until_delivered(tmp_path):
    from stack import embedded_stack

    stack = embedded_stack(tmp_path)
    stack.variables.update({"PALIMPSEST_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "PALIMPSEST_WEBHOOK_SECRET": SECRET,
                            "PALIMPSEST_WEBHOOK_RETRY_SECONDS": "1", "PALIMPSEST_WEBHOOK_MAX_ATTEMPTS": "5"})
    stack.migrate()
    engine = make_engine(stack.settings.database_url)
    session_factory = make_session_factory(engine)
    try:
        with Receiver([500, 500, 200]) as receiver:
            _, delivery_id = finished_job(session_factory, receiver.url)
            stack.start_worker(queues="cpu")
            stack.celery().send_task("workers.webhooks.deliver_webhook", args=[delivery_id])
            requests = receiver.wait_for(3, timeout=90)
            time.sleep(0.5)  # the worker records the answer after the receiver saw the request
            gaps = [b.at - a.at for a, b in zip(requests, requests[1:])]
            from stack import wait_until

            row = wait_until(lambda: (d := delivery(session_factory, delivery_id)).status == "delivered" and d,
                             timeout=30, what="delivered")
        assert (row.attempts, row.last_status_code) == (3, 200)
        assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps  # 1 s, then 2 s
        for request in requests:
            verify(SECRET, request.headers["Palimpsest-Signature"], request.body)
    finally:
        stack.stop_all()
        engine.dispose()
