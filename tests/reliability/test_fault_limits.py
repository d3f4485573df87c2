"""Issue 7.6: time limits and cancel.

- Hard limit (``PALIMPSEST_TASK_TIME_LIMIT``, 8 s here, with no soft limit: with one,
  the pool starts the hard limit's clock only once the soft one fired): the pool kills
  the process running the job, which cannot record anything; the worker's parent process
  fails the job ``timeout`` (``workers.jobs.JobRequest``), once: the beat's reconciler,
  running all along, never sends it again.
- Soft limit (``PALIMPSEST_TASK_SOFT_TIME_LIMIT``, 5 s here): the job itself catches
  ``SoftTimeLimitExceeded`` and fails ``timeout``.
- Cancel: a running job (statistics, optimizing) stops within 5 s of ``POST
  /v1/jobs/{id}/cancel``, measured.
"""
import time

import pytest

from faults import fault_stack, now, seconds, warm_service

pytestmark = pytest.mark.integration

LONG = {"steps": 200_000, "plateau_patience": 0}  # far longer than any limit here


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with fault_stack(tmp_path_factory, "limits") as stack, warm_service(stack, workers=1, beat=True) as service:
        yield service


def use_worker(service, **variables):
    """Replace the worker with one started with these PALIMPSEST_* settings."""
    for worker in service.workers:
        worker.stop()
    service.workers.clear()
    for name in ("PALIMPSEST_TASK_TIME_LIMIT", "PALIMPSEST_TASK_SOFT_TIME_LIMIT"):
        service.stack.variables.pop(name, None)
    service.stack.variables.update(variables)
    return service.start_workers(1)[0]


def test_past_the_hard_limit_the_job_fails_timeout_exactly_once(service, figures):
    worker = use_worker(service, PALIMPSEST_TASK_TIME_LIMIT="8", PALIMPSEST_TASK_SOFT_TIME_LIMIT="0")
    job_id = service.submit(**LONG)
    job = service.wait_ended([job_id], timeout=120)[job_id]
    assert (job.status, job.error_code) == ("failed", "timeout"), job.error_message
    assert "hard time limit (8 s)" in job.error_message
    assert "Hard time limit (8s) exceeded" in worker.log()
    # several reconciler passes later: not sent again, not run again
    time.sleep(8)
    job = service.job(job_id)
    assert (job.status, job.attempts) == ("failed", 1)
    assert [e.status for e in service.transitions(job_id)] == ["queued", "running", "failed"]
    assert not [e for e in service.events(job_id) if e.message and e.message.startswith("reconciler")]
    # the worker goes on with the next job
    next_job = service.submit()
    assert service.wait_ended([next_job], timeout=120)[next_job].status == "succeeded"
    figures.update(time_limit_s=8, started_to_failed_s=seconds(job.started_at, job.finished_at))


@pytest.mark.slow
def test_past_the_soft_limit_the_job_fails_timeout(service, figures):
    use_worker(service, PALIMPSEST_TASK_SOFT_TIME_LIMIT="5", PALIMPSEST_TASK_TIME_LIMIT="60")
    job_id = service.submit(**LONG)
    job = service.wait_ended([job_id], timeout=120)[job_id]
    assert (job.status, job.error_code, job.attempts) == ("failed", "timeout", 1)
    assert "soft time limit (5 s)" in job.error_message
    assert [e.status for e in service.transitions(job_id)] == ["queued", "running", "failed"]
    figures.update(soft_limit_s=5, started_to_failed_s=seconds(job.started_at, job.finished_at))


@pytest.mark.parametrize("phase, params", [
    ("statistics", {"samples": 3136}),
    ("optimizing", LONG),
])
def test_a_cancelled_running_job_stops_within_5_s(service, phase, params, figures):
    if not service.workers or "PALIMPSEST_TASK_SOFT_TIME_LIMIT" in service.stack.variables:
        use_worker(service)
    job_id = service.submit(**params)
    service.wait_phase(job_id, phase, timeout=300)
    time.sleep(1)  # well inside the phase
    asked = now()
    assert service.client.cancel(job_id)["cancel_requested"] is True
    job = service.wait_ended([job_id], timeout=30)[job_id]
    assert job.status == "cancelled"
    assert [e.status for e in service.transitions(job_id)] == ["queued", "running", "cancelled"]
    stopped_s = seconds(asked, job.finished_at)
    assert stopped_s < 5
    figures.update(phase=phase, cancel_to_cancelled_s=stopped_s)
