"""Keeping a worker's leases alive while it is busy, from a background thread.

The work itself (loading a checkpoint, waiting on a statistic, one optimizer step) can
block for a while, so leases are renewed by a thread rather than from progress
callbacks: every ``ttl / 3`` seconds it renews the job's lease (``lifecycle.heartbeat``)
and the statistic's lease this worker holds, if any. In between, once a ``poll``
(1 s), it reads the job's ``cancel_requested`` flag, so a cancel is seen within about a
second; the work polls ``should_stop()`` between steps and batches.

A lost lease (another worker took the job over after ours expired) sets ``job_lost``;
the work then stops and writes nothing more. A worker that is stopping (``ShutdownNotice``,
past its grace: ``handback``) sets ``handing_back``; the work stops the same way and the
job is released to the queue (docs/workers.md, Shutdown). Database errors in the thread are logged
and retried at the next beat: if they last longer than the lease, the lease expires and
the fencing token keeps a late write of ours from landing.
"""
import ctypes
import logging
import multiprocessing
import os
import signal
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


class ShutdownNotice:
    """"This worker is stopping", from its main process to its pool processes.

    Celery tells only the main process that it must stop (SIGTERM starts a warm shutdown
    there, ``worker_shutting_down``); the pool process running a task would go on until the
    task ends. The notice is shared memory mapped before the pool forks, so every pool
    process (also one forked later) reads what the main process wrote: the ``monotonic``
    time it began to stop (one system-wide clock on Linux), 0 until then. One store of a
    double: safe from a signal handler, nothing to lock."""

    def __init__(self):
        self._since = multiprocessing.RawValue(ctypes.c_double, 0.0)

    def announce(self) -> None:
        if not self._since.value:  # the first signal starts the clock; a second does not restart it
            self._since.value = time.monotonic()

    def past(self, grace: float) -> bool:
        """Whether the worker has been stopping for at least ``grace`` seconds."""
        since = self._since.value
        return bool(since) and time.monotonic() - since >= grace

    def wait(self, timeout: float) -> bool:
        """Whether the worker is stopping, or begins to within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._since.value:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True


# How long a pool process that got SIGTERM waits for its main process to say it is stopping.
# Both get a group's signal at once; the main process's handler runs within milliseconds.
GROUP_SIGTERM_WAIT_S = 1.0


def sigterm_handler(notice: ShutdownNotice, previous, wait_s: float = GROUP_SIGTERM_WAIT_S):
    """A pool process's SIGTERM handler that tells a SIGTERM to the worker's whole process
    group (systemd's default KillMode, a supervisor's stopasgroup) from one aimed at this
    process alone.

    Billiard's own handler (``previous``) exits at once: the running job was lost with the
    process and waited for its lease to expire and for the reconciler. When the main process
    got the signal too, it begins a warm shutdown, and the job is handed back after the
    grace like any other. A SIGTERM from the main process itself (a cold shutdown cancelling
    tasks, a revoke with terminate, billiard's hard time limit) comes with no warm shutdown:
    ``previous`` handles it, after at most ``wait_s``. A second SIGTERM goes to ``previous``.
    """

    def handle(signum, frame):
        signal.signal(signum, previous)
        if notice.wait(wait_s):
            return
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL or SIG_IGN, restored above
            os.kill(os.getpid(), signum)

    handle.defers_to = previous
    return handle


def handback_after(shutdown: "ShutdownNotice | None", grace: float):
    """A ``Heartbeat``'s ``handback``: true once the worker has been stopping for ``grace``
    seconds (None, never handed back, without a notice)."""
    return None if shutdown is None else (lambda: shutdown.past(grace))


def send_handed_back(send, what: str) -> None:
    """``send()`` the task of work handed back. A broker that refuses it is logged, not
    raised: the row is left without a lease, and the reconciler sends its task again."""
    try:
        send()
    except Exception:
        log.exception("%s: handed back but not sent again; left to the reconciler", what)


class Heartbeat:
    """``with Heartbeat(session_factory, ttl, job_lease) as hb:`` renews until the block ends.

    ``job_lease`` (a ``lifecycle.Lease``) may be None, for work that is not a job (a
    statistic precomputed on request). ``handback``: a predicate, read once a ``poll``, that
    says the job must be handed back (the worker is stopping). Flags: ``cancel_requested``,
    ``job_lost``, ``handing_back``, ``statistic_lost``.
    """

    def __init__(self, session_factory, ttl: float, job_lease=None, poll: float = 1.0, handback=None):
        self.session_factory = session_factory
        self.ttl = ttl
        self.job_lease = job_lease
        self.poll = min(poll, ttl / 3)
        self.cancel_requested = False
        self.job_lost = False
        self.handback = handback
        self.handing_back = False
        self.statistic_lost = False
        self._statistic = None  # (id, token) of the statistic lease held, if any
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="palimpsest-heartbeat", daemon=True)

    def should_stop(self) -> bool:
        """True once the job was cancelled, its lease lost, or it is being handed back."""
        return self.cancel_requested or self.job_lost or self.handing_back

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
            # before the beat: a database that is away must not delay the hand-back
            if self.handback is not None and not self.handing_back and self.handback():
                self.handing_back = True
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
