"""Keeping a worker's leases alive while it is busy, from a background thread.

The work itself (loading a checkpoint, waiting on a statistic, one optimizer step) can
block for a while, so leases are renewed by a thread rather than from progress
callbacks: every ``ttl / 3`` seconds it renews the job's lease (``lifecycle.heartbeat``)
and the statistic's lease this worker holds, if any. In between, once a ``poll``
(1 s), it reads the job's ``cancel_requested`` flag, so a cancel is seen within about a
second; the work polls ``should_stop()`` between steps and batches.

A lost lease (another worker took the job over after ours expired) sets ``job_lost``;
the work then stops and writes nothing more. Database errors in the thread are logged
and retried at the next beat: if they last longer than the lease, the lease expires and
the fencing token keeps a late write of ours from landing.
"""
import logging
import os
import socket
import threading
import time

from sqlalchemy import select

from storage import lifecycle
from storage.db import session_scope
from storage.models import Job

log = logging.getLogger(__name__)


def worker_name(pid: int | None = None) -> str:
    """``host:pid``, the lease owner recorded on rows this process (or process ``pid``) works on."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


class Heartbeat:
    """``with Heartbeat(session_factory, ttl, job_lease) as hb:`` renews until the block ends.

    ``job_lease`` (a ``lifecycle.Lease``) may be None, for work that is not a job (a
    statistic precomputed on request). Flags: ``cancel_requested``, ``job_lost``,
    ``statistic_lost``.
    """

    def __init__(self, session_factory, ttl: float, job_lease=None, poll: float = 1.0):
        self.session_factory = session_factory
        self.ttl = ttl
        self.job_lease = job_lease
        self.poll = min(poll, ttl / 3)
        self.cancel_requested = False
        self.job_lost = False
        self.statistic_lost = False
        self._statistic = None  # (id, token) of the statistic lease held, if any
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="palimpsest-heartbeat", daemon=True)

    def should_stop(self) -> bool:
        """True once the job was cancelled or its lease lost."""
        return self.cancel_requested or self.job_lost

    def hold_statistic(self, statistic_id: str, token: int) -> None:
        with self._lock:
            self._statistic = (statistic_id, token)
            self.statistic_lost = False

    def drop_statistic(self) -> None:
        with self._lock:
            self._statistic = None

    def beat(self, renew: bool) -> None:
        """One beat: renew the leases (``renew``) or only read the cancel flag."""
        from workers.statistics import renew_statistic

        with self._lock:
            statistic = self._statistic
        with session_scope(self.session_factory) as session:
            if self.job_lease is not None and not self.job_lost:
                try:
                    if renew:
                        cancel = lifecycle.heartbeat(session, self.job_lease, self.ttl)
                    else:
                        cancel = session.scalar(select(Job.cancel_requested).where(Job.id == self.job_lease.job_id))
                    self.cancel_requested = self.cancel_requested or bool(cancel)
                except lifecycle.LeaseLost:
                    self.job_lost = True
            if renew and statistic is not None and not renew_statistic(session, *statistic, self.ttl):
                with self._lock:
                    if self._statistic == statistic:
                        self.statistic_lost = True

    def _run(self) -> None:
        next_renewal = time.monotonic() + self.ttl / 3
        while not self._stopped.wait(self.poll):
            now = time.monotonic()
            renew = now >= next_renewal
            try:
                self.beat(renew)
                if renew:
                    next_renewal = now + self.ttl / 3
            except Exception:  # the database hiccuped: try again at the next beat
                log.warning("heartbeat failed; retrying", exc_info=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stopped.set()
        self._thread.join()
        return False
