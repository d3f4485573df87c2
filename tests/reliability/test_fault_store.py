"""Issue 7.5: the object store fails or refuses connections while a job uploads.

Everything reaches the S3 server (moto, started by the test session) through a TCP proxy
of the test's own (``faults.TcpProxy``), which can refuse connections (its port closed)
or fail them (accept, then reset); the server keeps its data meanwhile. The outage
starts while the job holds its uploading phase open (``PALIMPSEST_TEST_SLOW_UPLOAD_SECONDS``).

- A short outage: botocore's own retries give up within a second, then the worker
  retries each upload with backoff (``PALIMPSEST_STORAGE_RETRY_SECONDS``, 60 s here):
  the job succeeds, with all four artifacts in the store.
- An outage longer than that budget (6 s here): the job fails ``storage_unavailable``
  and no artifact is recorded. Retrying means submitting the same request again (a new
  job; the failed one keeps its record): once the store is back, it succeeds.
"""
import time
from urllib.parse import urlsplit

import pytest

from faults import TcpProxy, assert_one_artifact_set, demo_body, fault_stack, now, seconds, warm_service

pytestmark = pytest.mark.integration

OUTAGE_S = 8


@pytest.fixture(scope="module")
def service(tmp_path_factory, s3_server):
    upstream = urlsplit(s3_server)
    proxy = TcpProxy((upstream.hostname, upstream.port))
    proxy.up()
    try:
        with fault_stack(tmp_path_factory, "store", s3_endpoint=proxy.endpoint, PALIMPSEST_TEST_SLOW_UPLOAD_SECONDS="2",
                         PALIMPSEST_STORAGE_RETRY_SECONDS="60") as stack, warm_service(stack, workers=1) as service:
            service.proxy = proxy
            yield service
    finally:
        proxy.down()


@pytest.mark.parametrize("mode", ["refuse", pytest.param("reset", marks=pytest.mark.slow)])
def test_uploads_are_retried_through_an_outage(service, mode, figures):
    job_id = service.submit()
    service.wait_phase(job_id, "uploading", timeout=300)
    down_at = now()
    service.proxy.down(mode)
    time.sleep(OUTAGE_S)
    service.proxy.restore()
    up_at = now()

    job = service.wait_ended([job_id], timeout=300)[job_id]
    assert (job.status, job.attempts) == ("succeeded", 1), (job.error_code, job.error_message)
    assert job.finished_at > up_at
    assert_one_artifact_set(service, job_id)
    log = service.workers[0].log()
    retries = log.count(f"job {job_id}: upload")
    assert retries >= 2 and "StorageUnavailable" in log
    figures.update(mode=mode, outage_s=seconds(down_at, up_at), upload_retries=retries,
                   store_back_to_succeeded_s=seconds(up_at, job.finished_at))


def test_a_store_that_stays_down_fails_the_job_and_a_resubmission_succeeds(service, figures):
    # a worker with a short retry budget: the outage outlasts it
    service.workers[0].stop()
    service.workers.clear()
    service.stack.variables["PALIMPSEST_STORAGE_RETRY_SECONDS"] = "6"
    service.start_workers(1)

    body = demo_body(service.model_id)
    job_id = service.client.submit(body)["id"]
    service.wait_phase(job_id, "uploading", timeout=300)
    down_at = now()
    service.proxy.down("refuse")
    try:
        job = service.wait_ended([job_id], timeout=120)[job_id]
        failed_at = now()
    finally:
        service.proxy.restore()
    assert (job.status, job.error_code) == ("failed", "storage_unavailable")
    assert service.artifacts(job_id) == []
    shown = service.client.job(job_id)
    assert shown["error"]["code"] == "storage_unavailable" and shown["artifacts"] == []

    again = service.client.submit(body)["id"]  # the retry: the same request, a new job
    assert again != job_id
    final = service.wait_ended([again], timeout=300)[again]
    assert final.status == "succeeded"
    assert_one_artifact_set(service, again)
    assert service.job(job_id).status == "failed"  # the first keeps its record
    figures.update(store_down_to_failed_s=seconds(down_at, failed_at), retry_budget_s=6)
