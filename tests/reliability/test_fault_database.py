"""Issue 7.4: the database goes down for 10 s.

The test runs its own PostgreSQL cluster (initdb in a temporary directory, its own port),
never the machine's, and stops it (``pg_ctl stop -m fast``) while a job is in its uploading
phase, so that the job's final write (artifacts + ``succeeded``, one transaction) meets
the outage.

- The API answers 503 ``service_unavailable`` with ``Retry-After`` to writes and reads
  alike (every request needs the database, if only to check its key), stays alive
  (``/v1/healthz`` 200, ``/v1/readyz`` 503 naming the database), and serves again once the
  database is back, without a restart.
- The worker retries its writes with backoff (``PALIMPSEST_DB_RETRY_SECONDS``): the job
  running across the outage ends ``succeeded``, once, on its first attempt.
"""
import time

import pytest
import requests

from faults import PostgresCluster, assert_one_artifact_set, demo_body, fault_stack, now, seconds, warm_service

pytestmark = pytest.mark.integration

OUTAGE_S = 10


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    cluster = PostgresCluster()
    cluster.init()
    cluster.start()
    try:
        # a lease longer than the outage: the job is not taken over, its writes wait
        with fault_stack(tmp_path_factory, "database", database_url=cluster.url, PALIMPSEST_JOB_LEASE_SECONDS="30",
                         PALIMPSEST_TEST_SLOW_UPLOAD_SECONDS="2") as stack, \
                warm_service(stack, workers=1, beat=True) as service:
            service.cluster = cluster
            yield service
    finally:
        cluster.remove()


def test_database_down_for_10_s(service, figures):
    api, http = service.server.url, service.client.session
    body = demo_body(service.model_id)
    job_id = service.submit()
    service.wait_phase(job_id, "uploading", timeout=300)

    down_at = now()
    service.cluster.stop()
    refused = []
    deadline = time.monotonic() + OUTAGE_S - (now() - down_at).total_seconds()
    while time.monotonic() < deadline:
        for response in (http.post(f"{api}/v1/jobs", json=body, timeout=10),
                         http.get(f"{api}/v1/jobs/{job_id}", timeout=10)):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "service_unavailable"
            assert int(response.headers["Retry-After"]) > 0
            refused.append(response.status_code)
        assert requests.get(f"{api}/v1/healthz", timeout=10).status_code == 200
        ready = requests.get(f"{api}/v1/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["failed"] == ["database"]
        time.sleep(0.5)
    service.cluster.start()
    up_at = now()

    # the same API processes serve again
    def accepted():
        response = http.post(f"{api}/v1/jobs", json=body, timeout=10)
        return response.json()["id"] if response.status_code == 202 else None

    from stack import wait_until

    after = wait_until(accepted, 60, interval=0.2, what="a submission accepted again")
    api_back_at = now()
    assert service.server.alive()

    finals = service.wait_ended([job_id, after], timeout=300)
    job = finals[job_id]
    assert (job.status, job.attempts) == ("succeeded", 1)
    assert [e.status for e in service.transitions(job_id)] == ["queued", "running", "succeeded"]
    assert job.finished_at > up_at  # its final write waited for the database
    assert_one_artifact_set(service, job_id)
    assert finals[after].status == "succeeded"
    worker_log = service.workers[0].log()
    # the uploads' first database write (dropping a key's deletion record) or the finish waited
    waited = worker_log.count(": revive failed") + worker_log.count(f"job {job_id}: finish failed")
    assert waited and "retrying in" in worker_log

    figures.update(outage_s=seconds(down_at, up_at), refused_503=len(refused),
                   restart_to_api_accepts_s=seconds(up_at, api_back_at),
                   restart_to_job_succeeded_s=seconds(up_at, job.finished_at), database_write_retries=waited)


def test_database_down_while_a_statistic_is_computed(service, figures):
    """The outage meets the statistics phase: the statistic's own writes (its completion,
    the next step of the waiting loop), the job's progress and its milestones wait for the
    database; nothing is recomputed by another attempt."""
    before = len(service.workers[0].log().splitlines())
    job_id = service.submit(samples=4096)  # a statistic of its own: a few seconds of forward passes
    service.wait_phase(job_id, "statistics", timeout=300)
    down_at = now()
    service.cluster.stop()
    time.sleep(max(0.0, OUTAGE_S - (now() - down_at).total_seconds()))
    service.cluster.start()
    up_at = now()

    job = service.wait_ended([job_id], timeout=300)[job_id]
    assert (job.status, job.attempts) == ("succeeded", 1), (job.error_code, job.error_message)
    assert [e.status for e in service.transitions(job_id)] == ["queued", "running", "succeeded"]
    assert_one_artifact_set(service, job_id)
    worker_log = service.workers[0].log()
    waited = [line for line in worker_log.splitlines()[before:] if "retrying in" in line or "not written" in line]
    assert waited, "no write of the statistics phase met the outage"
    figures.update(outage_s=seconds(down_at, up_at), restart_to_job_succeeded_s=seconds(up_at, job.finished_at),
                   writes_retried=len(waited))
