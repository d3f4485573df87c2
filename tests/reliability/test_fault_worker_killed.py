"""Issue 7.1: a worker's whole process group is SIGKILLed while its job is in the
statistics, optimizing or uploading phase. The job must end ``succeeded`` exactly once, on
the other worker, with one artifact set and events that tell what happened; and it must
not wait for the broker's redelivery (Redis: the visibility timeout, 2 h here): the lease
expires, the reconciler (the beat, every 2 s) re-sends the job, the other worker takes the
lease over, and fencing keeps anything of the dead one from landing.

Real processes throughout: PostgreSQL, Redis, the S3 server, `palimpsest serve`, two
`palimpsest worker` processes and `palimpsest beat`. Once more on the embedded defaults
(SQLite, kombu's SQL broker, the file store), where the killed worker's message is not
merely held back but gone: only the reconciler can bring the job back.
"""
import pytest

from faults import assert_one_artifact_set, fault_stack, seconds, warm_service
from stack import embedded_stack

pytestmark = pytest.mark.integration

# Per phase: params that make the phase last long enough to be caught in it (a fresh
# statistic of 3008 images for "statistics"; 300 steps for "optimizing"; the test-only
# pause of PALIMPSEST_TEST_SLOW_UPLOAD_SECONDS for "uploading").
PHASES = {
    "statistics": {"samples": 3008},
    "optimizing": {"steps": 300},
    "uploading": {},
}


@pytest.fixture(scope="module")
def service(tmp_path_factory, s3_server):
    with fault_stack(tmp_path_factory, "killed", s3_endpoint=s3_server,
                     PALIMPSEST_TEST_SLOW_UPLOAD_SECONDS="5") as stack, \
            warm_service(stack, workers=2, beat=True) as service:
        yield service


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    with warm_service(embedded_stack(tmp_path_factory.mktemp("killed-embedded")), workers=2, beat=True) as service:
        yield service


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_worker_killed_in_each_phase_costs_one_retry(service, phase, figures):
    kill_and_recover(service, phase, figures)


def test_a_worker_killed_on_the_embedded_stack(embedded, figures):
    kill_and_recover(embedded, "optimizing", figures)


def kill_and_recover(service, phase, figures):
    while len(service.workers) < 2:  # replace the worker the previous case killed
        service.start_workers(1)
    job_id = service.submit(**PHASES[phase])
    job = service.wait_phase(job_id, phase, timeout=300)
    victim = service.worker_of(job)
    killed_at = service.kill(victim)

    final = service.wait_ended([job_id], timeout=300)[job_id]
    assert (final.status, final.error_code) == ("succeeded", None), final.error_message
    assert final.attempts == 2

    events = service.events(job_id)
    transitions = [e for e in events if e.kind == "transition"]
    assert [e.status for e in transitions] == ["queued", "running", "running", "succeeded"]
    claimed, taken_over = transitions[1], transitions[2]
    assert job.lease_owner in claimed.message  # the killed worker's claim
    assert f"lease of {job.lease_owner} expired; taken over by" in taken_over.message
    assert str(victim.pid) not in taken_over.message.split("taken over by")[1]
    # the reconciler re-sent it (the broker alone would have waited 2 h), after the kill
    resent = [e for e in events if e.message and e.message.startswith("reconciler: re-sent")]
    assert resent and killed_at < resent[0].created_at < taken_over.created_at
    # the dead worker wrote nothing after the take-over: every later progress event is the new owner's
    assert [e.phase for e in events if e.kind == "progress" and e.seq > taken_over.seq][0] == "loading"
    assert_one_artifact_set(service, job_id)

    figures.update(stack=service.stack.name, phase=phase, kill_to_reclaimed_s=seconds(killed_at, taken_over.created_at),
                   kill_to_succeeded_s=seconds(killed_at, final.finished_at),
                   kill_to_resent_s=seconds(killed_at, resent[0].created_at),
                   lease_s=int(service.stack.variables["PALIMPSEST_JOB_LEASE_SECONDS"]),
                   reconcile_interval_s=int(service.stack.variables["PALIMPSEST_RECONCILE_INTERVAL_SECONDS"]))
