"""Issue 7.2 and 7.3: the broker restarts, or loses everything.

The test runs its own ``redis-server`` (append-only, fsync every second, its own port and
directory). Jobs are quick (a statistic computed once up front, 5 steps), so a hundred of
them drain in a couple of minutes on two worker processes.

- Restart: 100 jobs queued, some running; Redis stopped and started again. Every job ends
  in a terminal state, succeeded exactly once (one ``succeeded`` transition, one artifact
  set). The slow variant crashes Redis (SIGKILL, so up to a second of writes is lost)
  under 300 jobs.
- FLUSHALL: every message is gone, queued and delivered. The reconciler re-sends each job
  the database holds as queued with no message; all complete. Once as the periodic task
  (the beat), once as ``palimpsest reconcile`` (no beat: the jobs stay queued until it runs).
"""
import signal
import time

import pytest

from faults import cli, fault_stack, now, seconds, warm_service
from stack import wait_until

pytestmark = pytest.mark.integration

RESENT = "reconciler: re-sent"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with fault_stack(tmp_path_factory, "broker") as stack, warm_service(stack, workers=2, beat=True) as service:
        yield service


def counts(service, job_ids) -> dict:
    found = {}
    for job in service.jobs(job_ids).values():
        found[job.status] = found.get(job.status, 0) + 1
    return found


def assert_each_succeeded_once(service, job_ids):
    """Every job succeeded, with exactly one ``succeeded`` transition and one artifact set;
    returns how many the reconciler re-sent."""
    from sqlalchemy import func, select

    from storage.models import Artifact, JobEvent

    jobs = service.jobs(job_ids)
    assert len(jobs) == len(job_ids)
    bad = {j.id: (j.status, j.error_code, j.error_message) for j in jobs.values() if j.status != "succeeded"}
    assert not bad, bad
    with service.session() as session:
        succeeded = dict(session.execute(
            select(JobEvent.job_id, func.count()).where(
                JobEvent.job_id.in_(job_ids), JobEvent.kind == "transition", JobEvent.status == "succeeded",
            ).group_by(JobEvent.job_id)).all())
        artifacts = dict(session.execute(
            select(Artifact.job_id, func.count()).where(Artifact.job_id.in_(job_ids)).group_by(Artifact.job_id)).all())
        resent = session.scalar(select(func.count(func.distinct(JobEvent.job_id))).where(
            JobEvent.job_id.in_(job_ids), JobEvent.message.like(f"{RESENT}%")))
    assert set(succeeded.values()) == {1} and len(succeeded) == len(job_ids)
    assert set(artifacts.values()) == {4} and len(artifacts) == len(job_ids)
    return resent


def submit_until_running(service, count: int) -> list:
    job_ids = [service.submit() for _ in range(count)]
    wait_until(lambda: counts(service, job_ids).get("running"), 120, interval=0.1, what="a job running")
    return job_ids


@pytest.mark.parametrize("count, crash", [
    pytest.param(100, False, id="restart-100"),
    pytest.param(300, True, id="crash-300", marks=pytest.mark.slow),
])
def test_broker_restart_loses_no_job_and_runs_none_twice(service, count, crash, figures):
    redis = service.stack.redis
    started = time.monotonic()
    job_ids = submit_until_running(service, count)
    at_restart = counts(service, job_ids)
    down_at = now()
    if crash:
        redis.process.send_signal(signal.SIGKILL)
        redis.process.wait(timeout=10)
    else:
        redis.stop()
    time.sleep(3)
    redis.start()
    up_at = now()

    finals = service.wait_ended(job_ids, timeout=900 if crash else 600)
    resent = assert_each_succeeded_once(service, job_ids)
    figures.update(jobs=count, crash=crash, at_restart=at_restart,
                   succeeded=sum(j.status == "succeeded" for j in finals.values()),
                   succeeded_twice=0, resent_by_reconciler=resent, broker_down_s=seconds(down_at, up_at),
                   restart_to_all_done_s=seconds(up_at, max(j.finished_at for j in finals.values())),
                   total_s=round(time.monotonic() - started, 1))


def test_broker_flushall_reconciled_by_the_periodic_task(service, figures):
    assert service.beat is not None and service.beat.alive()
    job_ids = submit_until_running(service, 12)
    flushed_at = now()
    service.stack.redis.client().flushall()
    queued = counts(service, job_ids).get("queued", 0)

    finals = service.wait_ended(job_ids, timeout=300)
    resent = assert_each_succeeded_once(service, job_ids)
    assert resent >= queued - 1 > 0  # the lost ones came back through the reconciler (one may have been taken)
    figures.update(jobs=len(job_ids), queued_at_flush=queued, resent_by_reconciler=resent,
                   flush_to_all_done_s=seconds(flushed_at, max(j.finished_at for j in finals.values())))


def test_broker_flushall_reconciled_by_the_command(service, figures):
    service.beat.stop()  # nothing periodic: only `palimpsest reconcile` can bring the jobs back
    job_ids = submit_until_running(service, 8)
    service.stack.redis.client().flushall()
    queued = [j for j, job in service.jobs(job_ids).items() if job.status == "queued"]
    assert queued
    # with their messages gone, nothing takes them, however long we wait
    wait_until(lambda: not counts(service, job_ids).get("running"), 120, interval=0.2, what="running jobs done")
    time.sleep(4)
    assert sorted(j for j, job in service.jobs(job_ids).items() if job.status == "queued") == sorted(queued)

    ran_at = now()
    out = cli(service.stack, "reconcile")
    assert sorted(line.split()[-1] for line in out.splitlines() if line.startswith("re-sent job")) == sorted(queued)
    finals = service.wait_ended(job_ids, timeout=300)
    assert assert_each_succeeded_once(service, job_ids) == len(queued)
    assert cli(service.stack, "reconcile") == ""  # nothing left to re-send
    figures.update(jobs=len(job_ids), queued_at_flush=len(queued),
                   reconcile_to_all_done_s=seconds(ran_at, max(j.finished_at for j in finals.values())))
