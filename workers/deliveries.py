"""Counting a task's deliveries on its row, so that a task that kills its worker ends.

Tasks are acknowledged late and rejected when their worker is lost
(``workers/celery_app.py``), so a task that kills its process (out of memory,
``os._exit``) is delivered again, and again. ``run_job`` counts its claims
(``storage.lifecycle.claim``); ``compute_shard`` counts its shard's claims
(``statistic_shards.attempts``); the other tasks on a row (``inspect_model`` on a model,
``compute_statistic`` on a statistic, ``merge_batch`` on a batch) count their deliveries
here. ``counted`` increments the row's ``deliveries`` and sets ``delivered_at`` in a
transaction of its own, committed before any work, and clears ``delivered_at`` when the
delivery ends in the process (returned or raised). A delivery that finds it is number
``max_deliveries + 1`` or later gives the row up (``failed``, ``worker_lost``) instead of
working: the deliveries before it ended in a dead worker (or a store outage each time).

A delivery under way started less than the hard time limit ago and has not ended (the
pool kills any task at that limit): the reconciler does not send its task again meanwhile
(``not_in_flight``).
"""
import logging
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import or_, update
from sqlalchemy.exc import DBAPIError

from storage.db import session_scope
from storage.models import utcnow
from workers.retry import retry_transaction

log = logging.getLogger(__name__)

WORKER_LOST = "worker_lost"


@contextmanager
def counted(session_factory, table, row_id: str, retry_s: float):
    """``with counted(...) as n:`` n is this delivery's number (1 for the first)."""
    def start(session):
        return session.scalar(update(table).where(table.id == row_id)
                              .values(deliveries=table.deliveries + 1, delivered_at=utcnow())
                              .returning(table.deliveries))

    number = retry_transaction(session_factory, start, budget_s=retry_s, what=f"{row_id}: delivery")
    try:
        yield number
    finally:
        try:
            with session_scope(session_factory) as session:
                session.execute(update(table).where(table.id == row_id).values(delivered_at=None)
                                .execution_options(synchronize_session=False))
        except DBAPIError:  # the database is away: the row looks in flight until the hard limit passes
            log.warning("%s: could not record the end of its delivery", row_id, exc_info=True)


def give_back(session_factory, table, row_id: str, retry_s: float) -> None:
    """Undo the count of a delivery that handed its work back (the worker was stopping): an
    orderly stop is not a worker death."""
    retry_transaction(session_factory, lambda session: session.execute(
        update(table).where(table.id == row_id, table.deliveries > 0)
        .values(deliveries=table.deliveries - 1).execution_options(synchronize_session=False)),
        budget_s=retry_s, what=f"{row_id}: give back")


def given_up(number: int | None, max_deliveries: int) -> bool:
    """Whether delivery ``number`` must give its row up instead of working."""
    return number is not None and number > max_deliveries


def lost_message(what: str, number: int, last_error: str | None = None) -> str:
    """The reason recorded on a row given up: ``worker_lost: ...``."""
    cause = f"the last one ended: {last_error}" if last_error else "its worker died each time (out of memory?)"
    return f"{WORKER_LOST}: {what} was delivered {number - 1} times without ending; {cause}"


def not_in_flight(table, now: datetime, hard_limit_s: float):
    """Rows with no delivery under way (a condition for ``where``)."""
    return or_(table.delivered_at.is_(None), table.delivered_at <= now - timedelta(seconds=hard_limit_s))
