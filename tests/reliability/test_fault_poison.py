"""A task that kills its pool process every time it runs (the kernel's OOM killer takes
the largest process: the pool child holding the model) must end. The worker's main process
survives, and rejects the message back to the queue (``task_reject_on_worker_lost``), so
the broker alone would deliver it forever. The row counts its deliveries
(``workers/deliveries.py``) and the delivery past ``PALIMPSEST_JOB_MAX_ATTEMPTS`` gives
it up ``worker_lost``.

Real processes: a PostgreSQL database and a Redis of the test's own, `palimpsest serve`,
one `palimpsest worker` (prefork, one child) whose pool child the test SIGKILLs in each
delivery of ``compute_statistic`` once the statistic is being computed.
``inspect_model`` and ``merge_batch`` count their deliveries through the same
``deliveries.counted``; tests/workers/test_deliveries.py covers each on the rows that
dead deliveries leave.
"""
import json
import signal

import pytest

from faults import DEMO_REQUEST, Service, fault_stack
from stack import wait_until

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 2


def test_a_statistic_that_kills_its_worker_each_time_is_given_up(tmp_path_factory):
    from storage.models import Statistic

    layer = json.loads(DEMO_REQUEST.read_text())["layer"]
    with fault_stack(tmp_path_factory, "poison", PALIMPSEST_JOB_MAX_ATTEMPTS=str(MAX_ATTEMPTS)) as stack:
        service = Service.open(stack, workers=1)
        try:
            worker = service.workers[0]
            body = {"model": service.model_id, "layer": layer, "samples": 2048}  # one piece, several seconds
            statistic_id = service.client.request("POST", "/v1/statistics", json=body).json()["id"]

            def row():
                with service.session() as session:
                    stat = session.get(Statistic, statistic_id)
                    session.expunge(stat)
                    return stat

            killed = []
            for delivery in range(1, MAX_ATTEMPTS + 1):
                def computing_in_child():
                    stat, children = row(), {p.pid: p for p in worker.tree()[1:]}
                    owner_pid = int(stat.lease_owner.rsplit(":", 1)[1]) if stat.lease_owner else None
                    ready = stat.status == "computing" and stat.deliveries == delivery and owner_pid in children
                    return children[owner_pid] if ready else None

                child = wait_until(computing_in_child, 120, what=f"delivery {delivery} computing in a pool child")
                child.send_signal(signal.SIGKILL)
                killed.append(child.pid)

            # the giving-up delivery waits out the lease the last dead child left on the row
            final = wait_until(lambda: (stat := row()).status == "failed" and stat, 120, what="the statistic given up")
            assert final.deliveries == MAX_ATTEMPTS + 1
            assert final.error.startswith("worker_lost: compute_statistic was delivered 2 times without ending")
            assert final.delivered_at is None  # the giving-up delivery ended in its process
            assert worker.alive() and len(set(killed)) == MAX_ATTEMPTS  # a new child each time
            assert worker.log().count("WorkerLostError") >= MAX_ATTEMPTS
            shown = service.client.request("GET", f"/v1/statistics/{statistic_id}").json()
            assert shown["status"] == "failed" and shown["error"].startswith("worker_lost")
        finally:
            service.close()
