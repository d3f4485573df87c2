"""Retrying what a worker writes while the database or the object store is briefly away.

A job that has computed for minutes should not be thrown away because PostgreSQL
restarted or the S3 server dropped connections for a few seconds. ``retry_call(fn, ...)``
calls ``fn`` again, with exponential backoff, while it raises a *transient* error, for at
most ``budget_s`` seconds; then it raises the last error.

- Database (``DB_ERRORS``): SQLAlchemy's ``OperationalError`` and ``InterfaceError``
  (connection refused or lost, server shutting down, SQLite busy) and any ``DBAPIError``
  that SQLAlchemy marked as a disconnect. A failed attempt's session is rolled back and
  closed by ``storage.db.session_scope``, and SQLAlchemy invalidates the pool's broken
  connections, so the next attempt starts on a fresh one. Integrity errors and the
  like are not transient and are raised at once.
- Object store (``STORE_ERRORS``): ``storage.objects.StorageUnavailable``, raised once
  botocore's own retries (a few seconds) are spent.

``retry_transaction(session_factory, fn, ...)`` is the common case: ``fn(session)`` in
one transaction, tried again whole. What is retried must be safe to repeat: a whole
``session_scope`` transaction of compare-and-set writes (``storage.lifecycle``), or a
content-addressed upload.
"""
import logging
import time

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from storage.db import session_scope
from storage.objects import StorageUnavailable

log = logging.getLogger(__name__)

STORE_ERRORS = (StorageUnavailable,)
DB_ERRORS = (DBAPIError,)  # narrowed by ``transient``
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 8.0


def transient(error: BaseException) -> bool:
    """Whether trying again later may succeed."""
    if isinstance(error, (OperationalError, InterfaceError)):
        return True
    if isinstance(error, DBAPIError):
        return bool(error.connection_invalidated)
    return isinstance(error, STORE_ERRORS)


def retry_call(fn, *, budget_s: float, what: str, errors=DB_ERRORS, give_up=None,
               first_delay: float = FIRST_DELAY_S, max_delay: float = MAX_DELAY_S, sleep=time.sleep):
    """``fn()``, tried again after 0.5, 1, 2, 4, 8, 8, ... s while it raises a transient error
    of ``errors``, until ``budget_s`` seconds have passed; ``give_up()`` (e.g. the job was
    cancelled) ends the waiting early. Raises the last error."""
    deadline = time.monotonic() + budget_s
    delay = first_delay
    attempt = 1
    while True:
        try:
            return fn()
        except errors as error:
            if not transient(error) or time.monotonic() + delay > deadline or (give_up and give_up()):
                raise
            log.warning("%s failed (attempt %d: %s: %s); retrying in %.1f s", what, attempt,
                        type(error).__name__, str(error).splitlines()[0][:200], delay)
        sleep(delay)
        delay = min(delay * 2, max_delay)
        attempt += 1


def retry_transaction(session_factory, fn, *, budget_s: float, what: str, give_up=None):
    """``fn(session)`` in one ``session_scope`` transaction, retried whole (``retry_call``)
    while the database is away: ``fn`` must be a read or compare-and-set writes."""
    def attempt():
        with session_scope(session_factory) as session:
            return fn(session)
    return retry_call(attempt, budget_s=budget_s, what=what, give_up=give_up)
