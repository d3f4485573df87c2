"""Sending webhooks: ``deliver_webhook(delivery_id)``, on the ``cpu`` queue.

A ``WebhookDelivery`` row (queued by ``workers.batches.queue_webhook`` when a job or
batch ends) says what to send and where. Each attempt:

1. does nothing unless the delivery is still ``pending``;
2. checks the URL against ``PALIMPSEST_WEBHOOK_ALLOWED_HOSTS`` again (the list may have
   shrunk since the API accepted it): a host no longer allowed is never contacted, and
   the delivery ends ``refused``;
3. counts the attempt in the row and commits, before any byte leaves;
4. POSTs ``{"id", "type", "created_at", "data"}`` (``data``: the job or batch resource
   as it is now) signed with ``palimpsest.webhooks.sign``, without following redirects,
   without proxies from the environment, with a timeout;
5. ends ``delivered`` on a 2xx answer; on a 5xx, 408, 429, timeout or connection error
   it is retried after ``PALIMPSEST_WEBHOOK_RETRY_SECONDS`` doubling each time (at most
   ``MAX_BACKOFF_SECONDS``), until ``PALIMPSEST_WEBHOOK_MAX_ATTEMPTS``; any other answer
   (a redirect, a 4xx) or the last attempt ends it ``failed``.

Delivery is at least once: a receiver may see a notice twice (a worker lost after the
POST and before recording it) and should use ``id`` (also the ``Palimpsest-Delivery``
header) to drop repeats.
"""
import json
import logging
from dataclasses import dataclass

import requests
from celery import shared_task
from sqlalchemy import select, update

from palimpsest.webhooks import SIGNATURE_HEADER, sign, url_problem
from storage.db import session_scope
from storage.models import Artifact, Batch, Job, WebhookDelivery, utcnow
from storage.resources import batch_json, iso_time, job_json

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10
MAX_BACKOFF_SECONDS = 600  # below workers.batches.sweep's default stale_seconds (900), so it never races a retry
RETRY_STATUSES = {408, 429}  # and every 5xx
USER_AGENT = "Palimpsest-Webhook/1"


@dataclass(frozen=True)
class Outcome:
    status: str  # the delivery's status after this attempt
    retry_in: float | None = None  # seconds until the next attempt, when there is one
    status_code: int | None = None


def backoff(settings, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: base, 2 base, 4 base, ..."""
    return min(MAX_BACKOFF_SECONDS, settings.webhook_retry_seconds * 2 ** (attempts - 1))


def payload(session, delivery: WebhookDelivery, retention_seconds: int) -> dict | None:
    """The notice's JSON (the resource's, ``expires_at`` from ``retention_seconds``), or None
    when its job or batch no longer exists."""
    if delivery.event == "job.completed":
        job = session.get(Job, delivery.subject_id)
        if job is None:
            return None
        data = job_json(job, list(session.scalars(select(Artifact).where(Artifact.job_id == job.id))),
                        retention_seconds=retention_seconds)
    else:
        batch = session.get(Batch, delivery.subject_id)
        if batch is None:
            return None
        data = batch_json(batch, retention_seconds)
    return {"id": delivery.id, "type": delivery.event, "created_at": iso_time(delivery.created_at), "data": data}


def _record(session_factory, delivery_id: str, **values) -> None:
    with session_scope(session_factory) as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id,
                                                      WebhookDelivery.status == "pending")
                        .values(updated_at=utcnow(), **values).execution_options(synchronize_session=False))


def deliver(session_factory, settings, delivery_id: str, http=None) -> Outcome:
    """One attempt at a delivery (the body of ``deliver_webhook``). ``http``: a
    ``requests.Session``-like object (default: a fresh one that ignores proxy settings)."""
    with session_scope(session_factory) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.status != "pending":
            return Outcome(delivery.status if delivery is not None else "missing")
        problem = url_problem(delivery.url, settings.webhook_allowed_hosts)
        body = None if problem else payload(session, delivery, settings.retention_seconds)
        url, event, attempts = delivery.url, delivery.event, delivery.attempts + 1
    if problem:
        log.warning("webhook %s refused, not sent: %s", delivery_id, problem)
        _record(session_factory, delivery_id, status="refused", last_error=f"webhook: {problem}")
        return Outcome("refused")
    if body is None or not settings.webhook_secret:
        reason = "its subject no longer exists" if body is None else "PALIMPSEST_WEBHOOK_SECRET is not set"
        _record(session_factory, delivery_id, status="failed", last_error=reason)
        return Outcome("failed")
    _record(session_factory, delivery_id, attempts=WebhookDelivery.attempts + 1)  # counted before any byte leaves

    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "Palimpsest-Event": event,
               "Palimpsest-Delivery": delivery_id, SIGNATURE_HEADER: sign(settings.webhook_secret, data)}
    if http is None:
        http = requests.Session()
        http.trust_env = False  # no proxy or .netrc from the environment: the allow-listed host itself
    code, error = None, None
    try:
        response = http.post(url, data=data, headers=headers, timeout=TIMEOUT_SECONDS, allow_redirects=False)
        code = response.status_code
        response.close()
    except requests.RequestException as e:
        error = f"{type(e).__name__}: {e}"
    if code is not None and 200 <= code < 300:
        _record(session_factory, delivery_id, status="delivered", last_status_code=code, last_error=None,
                delivered_at=utcnow())
        return Outcome("delivered", status_code=code)
    transient = code is None or code >= 500 or code in RETRY_STATUSES
    if code is not None:
        error = f"HTTP {code}" + (" (redirects are not followed)" if 300 <= code < 400 else "")
    if transient and attempts < settings.webhook_max_attempts:
        _record(session_factory, delivery_id, last_status_code=code, last_error=error)
        return Outcome("pending", retry_in=backoff(settings, attempts), status_code=code)
    log.warning("webhook %s to %s failed after %d attempt(s): %s", delivery_id, url, attempts, error)
    _record(session_factory, delivery_id, status="failed", last_status_code=code, last_error=error)
    return Outcome("failed", status_code=code)


@shared_task(bind=True, name="workers.webhooks.deliver_webhook", max_retries=None)
def deliver_webhook(self, delivery_id: str) -> None:
    """Try a webhook delivery once; schedule the next try (a new message, with a countdown)
    while it may still succeed. Attempts are bounded by the row's count, not by Celery."""
    outcome = deliver(self.app.session_factory, self.app.settings, delivery_id)
    if outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in)
