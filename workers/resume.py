"""Saved progress that lets work handed back go on where it stopped.

A stopping worker (docs/workers.md, Shutdown) saves an optimizer's ``InsertState`` (a job's
insert, a merge's joint solve) in its tenant's space and names it on the row; the next run
loads it and goes on from that step. A state that cannot be saved, read or used is never an
error: that part of the work starts over. Statistics save their moment so far instead
(``workers.statistics``) and fall back the same way (``run_resumed``).
"""
import logging

from rewriting.errors import CheckpointError, IncompatibleError
from rewriting.insert import InsertState
from storage.objects import ObjectNotFound, StorageUnavailable
from workers.artifacts import ChecksumMismatch, fetch, put_bytes

log = logging.getLogger(__name__)

STATE_NAME = "insert_state.safetensors"  # tenants/<tenant>/resume/<sha256>/insert_state.safetensors


def save_state(session_factory, store, settings, tenant_id: str, state, what: str):
    """Upload an optimizer's ``InsertState`` to ``tenant_id``'s space (one try: the
    orchestrator's kill is near); its StoredObject, or None (``what`` starts over next time)."""
    try:
        return put_bytes(session_factory, store, state.to_bytes(), tenant_id, "resume", STATE_NAME,
                         "application/octet-stream", db_retry_s=settings.db_retry_seconds)
    except Exception:
        log.warning("%s: its optimizer state was not saved; the next run starts it over", what, exc_info=True)
        return None


def load_state(store, cache, key: str | None, sha256: str | None, what: str):
    """The ``InsertState`` at ``key`` (a row's resume_object_key), or None (none, or unreadable)."""
    if key is None:
        return None
    try:
        return InsertState.from_bytes(fetch(store, key, cache, sha256).read_bytes())
    except (ObjectNotFound, ChecksumMismatch, CheckpointError, StorageUnavailable):
        log.warning("%s: its saved state cannot be read; starting it over", what, exc_info=True)
        return None


def run_resumed(run, resume, what: str):
    """``(run(resume), resume)``, or ``(run(None), None)`` when ``resume`` does not fit
    (``IncompatibleError``: saved by another version of the engine, say)."""
    try:
        return run(resume), resume
    except IncompatibleError:
        if resume is None:
            raise
        log.warning("%s: its saved state does not fit; starting it over", what, exc_info=True)
        return run(None), None
