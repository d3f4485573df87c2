"""Tasks that kill their pool process every time they run (the kernel's OOM killer takes
the largest process: the pool child holding the model) must end. The worker's main
process survives and rejects the message back to the queue
(``task_reject_on_worker_lost``), so the broker alone would deliver it forever.

- ``compute_statistic``: the row counts its deliveries (``workers/deliveries.py``) and the
  delivery past ``PALIMPSEST_JOB_MAX_ATTEMPTS`` gives it up ``worker_lost``.
- ``run_job``: the redelivery finds the dead child's lease live and leaves the job; the
  reconciler re-sends it once the lease expires, and the claim past the cap fails it
  ``worker_lost``.

Real processes: a PostgreSQL database and a Redis of the tests' own, `palimpsest serve`,
`palimpsest beat`, one `palimpsest worker` (prefork, one child) whose pool child the tests
SIGKILL in each delivery, once the work is under way. ``inspect_model`` and
``merge_batch`` count their deliveries through the same ``deliveries.counted``;
tests/workers/test_deliveries.py covers each on the rows dead deliveries leave.
"""
import json
import signal

import pytest

from faults import DEMO_REQUEST, Service, fault_stack
from stack import wait_until

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 2


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with fault_stack(tmp_path_factory, "poison", PALIMPSEST_JOB_MAX_ATTEMPTS=str(MAX_ATTEMPTS)) as stack:
        service = Service.open(stack, workers=1, beat=True)
        try:
            yield service
        finally:
            service.close()


def read(service, table, row_id):
    with service.session() as session:
        row = session.get(table, row_id)
        session.expunge(row)
        return row


def kill_the_child_holding(service, table, row_id, under_way):
    """SIGKILL the worker's pool child once ``under_way(row)`` and the row's lease names
    that child (``host:pid``); the child's pid."""
    worker = service.workers[0]

    def holding_child():
        row, children = read(service, table, row_id), {p.pid: p for p in worker.tree()[1:]}
        owner_pid = int(row.lease_owner.rsplit(":", 1)[1]) if row.lease_owner else None
        return children[owner_pid] if under_way(row) and owner_pid in children else None

    child = wait_until(holding_child, 120, what=f"{row_id} under way in a pool child")
    child.send_signal(signal.SIGKILL)
    return child.pid


def test_a_statistic_that_kills_its_worker_each_time_is_given_up(service):
    from storage.models import Statistic

    worker = service.workers[0]
    layer = json.loads(DEMO_REQUEST.read_text())["layer"]
    body = {"model": service.model_id, "layer": layer, "samples": 2048}  # one piece, several seconds
    statistic_id = service.client.request("POST", "/v1/statistics", json=body).json()["id"]
    killed = [kill_the_child_holding(service, Statistic, statistic_id,
                                     lambda s, n=n: s.status == "computing" and s.deliveries == n)
              for n in range(1, MAX_ATTEMPTS + 1)]

    # the giving-up delivery waits out the lease the last dead child left on the row
    final = wait_until(lambda: (s := read(service, Statistic, statistic_id)).status == "failed" and s, 120,
                       what="the statistic given up")
    assert final.deliveries == MAX_ATTEMPTS + 1
    assert final.error.startswith("worker_lost: compute_statistic was delivered 2 times without ending")
    assert final.delivered_at is None  # the giving-up delivery ended in its process
    assert worker.alive() and len(set(killed)) == MAX_ATTEMPTS  # a new child each time
    assert worker.log().count("WorkerLostError") >= MAX_ATTEMPTS
    shown = service.client.request("GET", f"/v1/statistics/{statistic_id}").json()
    assert shown["status"] == "failed" and shown["error"].startswith("worker_lost")


def test_a_job_that_kills_its_worker_each_time_fails_worker_lost(service):
    from storage.models import Job

    worker = service.workers[0]
    job_id = service.submit(steps=300)
    killed = [kill_the_child_holding(service, Job, job_id,
                                     lambda j, n=n: j.phase == "optimizing" and j.attempts == n)
              for n in range(1, MAX_ATTEMPTS + 1)]

    final = service.wait_ended([job_id], timeout=120)[job_id]
    assert (final.status, final.error_code, final.attempts) == ("failed", "worker_lost", MAX_ATTEMPTS)
    assert worker.alive() and len(set(killed)) == MAX_ATTEMPTS
    transitions = [e for e in service.events(job_id) if e.kind == "transition"]
    assert [e.status for e in transitions] == ["queued", "running", "running", "failed"]
    assert service.client.job(job_id)["error"]["code"] == "worker_lost"
