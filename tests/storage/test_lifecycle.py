"""The job lifecycle on SQLite and PostgreSQL: legal transitions only, leases with
fencing so a stale worker cannot write, cancel in each state, events in order."""
import secrets
from datetime import timedelta

import pytest
from sqlalchemy import select

from storage import lifecycle
from storage.db import session_scope
from storage.lifecycle import IllegalTransition, LeaseLost
from storage.models import Job, JobEvent, Model, Tenant, utcnow


@pytest.fixture
def job_id(session_factory):
    with session_scope(session_factory) as s:
        tenant = Tenant(name=f"acme-{secrets.token_hex(4)}")
        s.add(tenant)
        s.flush()
        model = Model(name="demo", architecture="demo-gan", sha256="0" * 64, size=1, object_key="m")
        s.add(model)
        s.flush()
        return lifecycle.create_job(s, tenant_id=tenant.id, model_id=model.id, layer="layer4").id


def events(session_factory, job_id):
    with session_scope(session_factory) as s:
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)).all()
        return [(e.seq, e.kind, e.status) for e in rows]


def job(session_factory, job_id) -> Job:
    with session_scope(session_factory) as s:
        return s.get(Job, job_id)


def test_claim_run_succeed(session_factory, job_id):
    with session_scope(session_factory) as s:
        lease = lifecycle.claim(s, job_id, "w1", ttl=30)
    assert lease.token == 1
    with session_scope(session_factory) as s:
        assert lifecycle.claim(s, job_id, "w2", ttl=30) is None  # live lease: duplicate delivery
        lifecycle.report_progress(s, lease, "optimizing", step=10, total=100, loss=0.5, milestone=True)
        assert lifecycle.heartbeat(s, lease, ttl=30) is False
        lifecycle.finish(s, lease, "succeeded", metrics={"loss": 0.1})
    j = job(session_factory, job_id)
    assert (j.status, j.metrics, j.lease_owner, j.attempts) == ("succeeded", {"loss": 0.1}, None, 1)
    assert events(session_factory, job_id) == [
        (1, "transition", "queued"), (2, "transition", "running"), (3, "progress", "running"), (4, "transition", "succeeded")]
    with session_scope(session_factory) as s:
        assert lifecycle.claim(s, job_id, "w2", ttl=30) is None  # finished: never runs again


def test_expired_lease_is_taken_over_and_the_stale_worker_is_fenced(session_factory, job_id):
    with session_scope(session_factory) as s:
        stale = lifecycle.claim(s, job_id, "w1", ttl=30, now=utcnow() - timedelta(seconds=60))
    with session_scope(session_factory) as s:
        fresh = lifecycle.claim(s, job_id, "w2", ttl=30)
    assert fresh.token == stale.token + 1
    for write in (lambda s: lifecycle.heartbeat(s, stale, 30),
                  lambda s: lifecycle.report_progress(s, stale, "optimizing", 1, 2, 0.1),
                  lambda s: lifecycle.finish(s, stale, "succeeded")):
        with pytest.raises(LeaseLost), session_scope(session_factory) as s:
            write(s)
    with session_scope(session_factory) as s:
        lifecycle.finish(s, fresh, "succeeded")
    j = job(session_factory, job_id)
    assert (j.status, j.attempts) == ("succeeded", 2)
    assert [e[2] for e in events(session_factory, job_id)].count("succeeded") == 1


def test_cancel_queued_job_never_runs(session_factory, job_id):
    with session_scope(session_factory) as s:
        assert lifecycle.request_cancel(s, job_id).status == "cancelled"
    with session_scope(session_factory) as s:
        assert lifecycle.claim(s, job_id, "w1", ttl=30) is None
    assert job(session_factory, job_id).status == "cancelled"


def test_cancel_running_job_is_seen_at_heartbeat(session_factory, job_id):
    with session_scope(session_factory) as s:
        lease = lifecycle.claim(s, job_id, "w1", ttl=30)
    with session_scope(session_factory) as s:
        assert lifecycle.request_cancel(s, job_id).cancel_requested
    with session_scope(session_factory) as s:
        assert lifecycle.heartbeat(s, lease, 30) is True
        lifecycle.finish(s, lease, "cancelled")
    assert job(session_factory, job_id).status == "cancelled"


def test_finished_job_refuses_cancel_and_illegal_transitions(session_factory, job_id):
    with session_scope(session_factory) as s:
        lease = lifecycle.claim(s, job_id, "w1", ttl=30)
        lifecycle.finish(s, lease, "failed", error_code="timeout", error_message="too slow")
    with pytest.raises(IllegalTransition), session_scope(session_factory) as s:
        lifecycle.request_cancel(s, job_id)
    with pytest.raises(IllegalTransition), session_scope(session_factory) as s:
        lifecycle.finish(s, lease, "queued")
    j = job(session_factory, job_id)
    assert (j.status, j.error_code) == ("failed", "timeout")


def test_a_cancelled_job_whose_worker_died_ends_cancelled_not_rerun(session_factory, job_id):
    now = utcnow()
    with session_scope(session_factory) as s:
        lifecycle.claim(s, job_id, "w1", ttl=30, now=now, max_attempts=3)
    with session_scope(session_factory) as s:
        lifecycle.request_cancel(s, job_id)  # then w1 dies before it sees the cancel
    with session_scope(session_factory) as s:  # its lease is still live: left alone
        assert lifecycle.claim(s, job_id, "w2", ttl=30, now=now + timedelta(seconds=10), max_attempts=3) is None
    assert job(session_factory, job_id).status == "running"
    with session_scope(session_factory) as s:
        assert lifecycle.claim(s, job_id, "w2", ttl=30, now=now + timedelta(seconds=31), max_attempts=3) is None
    ended = job(session_factory, job_id)
    assert (ended.status, ended.attempts, ended.fencing_token, ended.lease_owner) == ("cancelled", 1, 1, None)
    assert events(session_factory, job_id)[-1] == (4, "transition", "cancelled")
    with session_scope(session_factory) as s:  # a later delivery finds it ended
        assert lifecycle.claim(s, job_id, "w3", ttl=30, now=now + timedelta(seconds=62)) is None


def test_an_event_written_after_lock_waits_for_the_other_writer(session_factory, job_id):
    """The reconciler's re-send event and a worker's milestone: both lock the job row
    first, so the second takes the next seq instead of colliding on (job_id, seq)."""
    import threading

    with session_scope(session_factory) as s:
        lease = lifecycle.claim(s, job_id, "w1", ttl=30)
    reconciler = session_factory()
    lifecycle.lock(reconciler, job_id)
    lifecycle.add_event(reconciler, job_id, "progress", status="running", message="reconciler: re-sent (x)")
    errors = []

    def worker():
        try:
            with session_scope(session_factory) as s:
                lifecycle.report_progress(s, lease, "statistics", milestone=True)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(0.5)  # it waits on the row (PostgreSQL) or the database (SQLite)
    reconciler.commit()
    reconciler.close()
    thread.join()
    assert errors == []
    assert [seq for seq, *_ in events(session_factory, job_id)] == [1, 2, 3, 4]


def test_release_hands_a_running_job_back_for_the_next_claim(session_factory, job_id):
    """A worker that is stopping releases its job: queued again at once (no lease to wait
    for), its claim given back, and its old lease fenced off."""
    with session_scope(session_factory) as s:
        stale = lifecycle.claim(s, job_id, "w1", ttl=30, max_attempts=1)
        lifecycle.report_progress(s, stale, "optimizing", step=10, total=100, loss=0.5, milestone=True)
    with session_scope(session_factory) as s:
        lifecycle.release(s, stale, "its worker was stopping")
    released = job(session_factory, job_id)
    assert (released.status, released.phase, released.progress_step, released.lease_owner,
            released.lease_expires_at, released.attempts, released.fencing_token) == \
        ("queued", None, None, None, None, 0, 1)
    for write in (lambda s: lifecycle.heartbeat(s, stale, 30),
                  lambda s: lifecycle.report_progress(s, stale, "optimizing", 11, 100, 0.4),
                  lambda s: lifecycle.finish(s, stale, "succeeded"),
                  lambda s: lifecycle.release(s, stale, "again")):
        with pytest.raises(LeaseLost), session_scope(session_factory) as s:
            write(s)
    with session_scope(session_factory) as s:  # at once, and not refused by max_attempts=1
        fresh = lifecycle.claim(s, job_id, "w2", ttl=30, max_attempts=1)
    assert fresh.token == stale.token + 1
    with session_scope(session_factory) as s:
        lifecycle.finish(s, fresh, "succeeded")
    j = job(session_factory, job_id)
    assert (j.status, j.attempts, j.lease_owner) == ("succeeded", 1, None)
    assert [e[1:] for e in events(session_factory, job_id)] == [
        ("transition", "queued"), ("transition", "running"), ("progress", "running"), ("transition", "queued"),
        ("transition", "running"), ("transition", "succeeded")]
    with session_scope(session_factory) as s:
        messages = s.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id, JobEvent.kind == "transition")
                             .order_by(JobEvent.seq)).all()
    assert messages[2] == "released by w1: its worker was stopping"
    assert messages[3] == "claimed by w2"


def test_release_by_a_worker_whose_lease_was_taken_over_changes_nothing(session_factory, job_id):
    with session_scope(session_factory) as s:
        stale = lifecycle.claim(s, job_id, "w1", ttl=30, now=utcnow() - timedelta(seconds=60))
    with session_scope(session_factory) as s:
        fresh = lifecycle.claim(s, job_id, "w2", ttl=30)
    with pytest.raises(LeaseLost), session_scope(session_factory) as s:
        lifecycle.release(s, stale, "its worker was stopping")
    j = job(session_factory, job_id)
    assert (j.status, j.lease_owner, j.fencing_token, j.attempts) == ("running", "w2", fresh.token, 2)
    with session_scope(session_factory) as s:  # a finished job cannot go back to the queue
        lifecycle.finish(s, fresh, "succeeded")
    with pytest.raises(LeaseLost), session_scope(session_factory) as s:
        lifecycle.release(s, fresh, "too late")
    assert job(session_factory, job_id).status == "succeeded"
    assert [e[2] for e in events(session_factory, job_id)].count("queued") == 1


def test_a_released_job_whose_cancel_was_requested_ends_cancelled_at_its_next_claim(session_factory, job_id):
    with session_scope(session_factory) as s:
        lease = lifecycle.claim(s, job_id, "w1", ttl=30)
    with session_scope(session_factory) as s:
        lifecycle.request_cancel(s, job_id)  # seen by w1 only after it decided to hand the job back
    with session_scope(session_factory) as s:
        lifecycle.release(s, lease, "its worker was stopping")
    with session_scope(session_factory) as s:
        assert lifecycle.claim(s, job_id, "w2", ttl=30) is None
    j = job(session_factory, job_id)
    assert (j.status, j.fencing_token) == ("cancelled", 1)


def resume_state(job_id, n):
    """A stored optimizer state of the job (its key names the job: the PostgreSQL database is shared)."""
    from storage.objects import StoredObject

    sha = f"{n:064x}"
    return StoredObject(key=f"tenants/{job_id}/resume/{sha}/insert_state.safetensors", sha256=sha, size=10)


def recorded(session_factory, job_id) -> set:
    from storage.models import DeletedObject

    with session_scope(session_factory) as s:
        return set(s.scalars(select(DeletedObject.object_key).where(
            DeletedObject.object_key.like(f"tenants/{job_id}/%"))))


@pytest.mark.parametrize("ending", ["finish", "fail_unclaimed", "cancel_queued", "give_up"])
def test_a_jobs_resume_state_lives_from_its_release_until_it_ends(session_factory, job_id, ending):
    """A release names the optimizer state; a later release without one keeps it, one with a
    new one replaces it (the old object goes to the sweep); every ending drops it."""
    first, second = resume_state(job_id, 1), resume_state(job_id, 2)
    with session_scope(session_factory) as s:
        lifecycle.release(s, lifecycle.claim(s, job_id, "w1", ttl=30), "stopping", resume=first)
    assert (job(session_factory, job_id).resume_object_key, recorded(session_factory, job_id)) == (first.key, set())
    with session_scope(session_factory) as s:  # handed back again before it optimized: kept
        lifecycle.release(s, lifecycle.claim(s, job_id, "w2", ttl=30), "stopping")
    assert job(session_factory, job_id).resume_sha256 == first.sha256
    with session_scope(session_factory) as s:
        lifecycle.release(s, lifecycle.claim(s, job_id, "w3", ttl=30), "stopping", resume=second)
    assert (job(session_factory, job_id).resume_object_key, recorded(session_factory, job_id)) == (second.key, {first.key})

    with session_scope(session_factory) as s:
        j = s.get(Job, job_id)
        if ending == "finish":
            lifecycle.finish(s, lifecycle.claim(s, job_id, "w4", ttl=30), "failed", error_code="x")
        elif ending == "fail_unclaimed":
            lifecycle.fail_unclaimed(s, j, "model_not_ready", "gone")
        elif ending == "cancel_queued":
            lifecycle.cancel_queued(s, j)
        else:
            lifecycle.claim(s, job_id, "w4", ttl=30, now=utcnow() - timedelta(seconds=60))
    if ending == "give_up":  # its worker died: the claim after the lease gives up on it
        with session_scope(session_factory) as s:
            assert lifecycle.claim(s, job_id, "w5", ttl=30, max_attempts=1) is None
    j = job(session_factory, job_id)
    assert j.status in ("failed", "cancelled")
    assert (j.resume_object_key, j.resume_sha256) == (None, None)
    assert recorded(session_factory, job_id) == {first.key, second.key}
