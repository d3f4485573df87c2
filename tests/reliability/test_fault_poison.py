"""Tasks that kill their pool process every time they run (the kernel's OOM killer takes
the largest process: the pool child holding the model) must end. The worker's main
process survives and rejects the message back to the queue
(``task_reject_on_worker_lost``), so the broker alone would deliver it forever.

- ``compute_statistic``: the row counts its deliveries (``workers/deliveries.py``) and the
  delivery past ``PALIMPSEST_JOB_MAX_ATTEMPTS`` gives it up ``worker_lost``.
- ``run_job``: the redelivery finds the dead child's lease live and leaves the job; the
  reconciler re-sends it once the lease expires, and the claim past the cap fails it
  ``worker_lost``.

- ``inspect_model``: like ``compute_statistic``; the model fails ``worker_lost: ...``.
- ``merge_batch``: the delivery past the cap records each group left failed
  ``worker_lost`` and completes the batch.

Real processes: a PostgreSQL database and a Redis of the tests' own, `palimpsest serve`,
`palimpsest beat`, one `palimpsest worker` (prefork, one child) whose pool child the tests
SIGKILL in each delivery, once the work is under way. tests/workers/test_deliveries.py
covers each task on the rows dead deliveries leave.
"""
import copy
import json
import signal

import pytest

from faults import DEMO_REQUEST, QUICK, Service, fault_stack
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
    """SIGKILL the worker's pool child once ``under_way(row)`` and that child runs the row's
    task; the child's pid. A row with a lease names its holder (``host:pid``); a model or a
    batch has none, and then the worker's one pool child (concurrency 1) is the one running
    the delivery that ``under_way`` saw started and not ended (``delivered_at``)."""
    worker = service.workers[0]

    def holding_child():
        row, children = read(service, table, row_id), {p.pid: p for p in worker.tree()[1:]}
        if not hasattr(row, "lease_owner"):
            return next(iter(children.values())) if under_way(row) and len(children) == 1 else None
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
    # (delivered_at is cleared in a transaction of its own, just after the status)
    final = wait_until(lambda: ended(read(service, Statistic, statistic_id), "failed"), 120,
                       what="the statistic given up")
    assert final.deliveries == MAX_ATTEMPTS + 1
    assert final.error.startswith("worker_lost: compute_statistic was delivered 2 times without ending")
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


def ended(row, *statuses):
    """``row`` once it is in one of ``statuses`` and its last delivery has ended, else None."""
    return row if row.status in statuses and row.delivered_at is None else None


def delivery_under_way(n):
    """A model's or a batch's delivery ``n`` has started and not ended (``workers/deliveries.py``)."""
    return lambda row: row.delivered_at is not None and row.deliveries == n


def test_an_inspection_that_kills_its_worker_each_time_fails_the_model(service, tmp_path):
    import torch

    from demo.generator import Generator
    from rewriting.checkpoint import save_model
    from storage.models import Model

    # A 512x512 generator: a 23 MB file whose inspection (one forward pass at full
    # resolution, workers.models.inspect_file) takes seconds, so the kill lands inside it.
    config = {"z_dim": 128, "resolution": 512, "channels": [256, 256, 256, 128, 128, 128, 128, 128]}
    torch.manual_seed(0)
    save_model(Generator(**config).eval(), tmp_path / "large.safetensors", "demo-gan", config)
    worker = service.workers[0]
    lost_before = worker.log().count("WorkerLostError")
    model_id = service.client.upload_model(tmp_path / "large.safetensors", name="large")["id"]
    killed = [kill_the_child_holding(service, Model, model_id,
                                     lambda m, n=n: m.status == "pending" and delivery_under_way(n)(m))
              for n in range(1, MAX_ATTEMPTS + 1)]

    final = wait_until(lambda: ended(read(service, Model, model_id), "failed", "ready"), 120,
                       what="the model given up")
    assert (final.status, final.deliveries, final.delivered_at) == ("failed", MAX_ATTEMPTS + 1, None)
    assert final.error.startswith("worker_lost: its inspection was delivered 2 times without ending")
    assert not final.layers  # never inspected to the end
    assert worker.alive() and len(set(killed)) == MAX_ATTEMPTS
    assert worker.log().count("WorkerLostError") - lost_before >= MAX_ATTEMPTS
    shown = service.client.request("GET", f"/v1/models/{model_id}").json()
    assert shown["status"] == "failed" and shown["error"].startswith("worker_lost")


def test_a_merge_that_kills_its_worker_each_time_completes_its_batch(service, tmp_path):
    from sqlalchemy import select

    from storage.models import Batch, BatchMerge

    def merges():
        with service.session() as session:
            return session.scalars(select(BatchMerge).where(BatchMerge.batch_id == batch_id)
                                   .order_by(BatchMerge.created_at)).all()

    # Two groups: two rules at the demo's layer, one at another. Each delivery is killed
    # once one group is merged, inside the other's merge, so the delivery that gives up
    # finds one group left.
    request = json.loads(DEMO_REQUEST.read_text())
    layer = request.pop("layer")
    other = copy.deepcopy(request)
    other["paste"]["seed"] = other["context"][0]["seed"] = 7
    # A merge optimizes for the most steps any of its members asked for, every one of
    # them (no plateau stop): seconds, so the kill lands inside it.
    params = {**QUICK, "steps": 1000, "plateau_patience": 0}
    lines = [{"custom_id": f"rule-{i}", "model": service.model_id, "layer": at, "request": r, "params": params}
             for i, (at, r) in enumerate([(layer, request), (layer, other), ("layer5", request)])]
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    worker = service.workers[0]
    lost_before = worker.log().count("WorkerLostError")
    batch_id = service.client.submit_batch(tmp_path / "edits.jsonl", merge=True)["id"]
    killed = [kill_the_child_holding(service, Batch, batch_id,
                                     lambda b, n=n: b.status == "finalizing" and delivery_under_way(n)(b)
                                     and len(merges()) == 1)
              for n in range(1, MAX_ATTEMPTS + 1)]
    (merged,) = merges()  # by the first delivery, before its kill

    final = wait_until(lambda: ended(read(service, Batch, batch_id), "completed", "failed"), 120,
                       what="the batch completed")
    assert (final.status, final.deliveries, final.delivered_at) == ("completed", MAX_ATTEMPTS + 1, None)
    assert (final.succeeded_count, final.failed_count) == (3, 0)
    done, left = merges()
    assert (done.id, done.status, done.error_code) == (merged.id, "succeeded", None) and done.checkpoint_object_key
    assert {done.layer, left.layer} == {layer, "layer5"} and left.rules == {layer: 2, "layer5": 1}[left.layer]
    assert (left.status, left.error_code, left.checkpoint_object_key) == ("failed", "worker_lost", None)
    assert left.error_message.startswith("worker_lost: the merge was delivered 2 times without ending")
    assert worker.alive() and len(set(killed)) == MAX_ATTEMPTS
    assert worker.log().count("WorkerLostError") - lost_before >= MAX_ATTEMPTS
    shown = service.client.batch(batch_id)
    assert shown["status"] == "completed" and shown["request_counts"]["succeeded"] == 3
    assert [(m["status"], m["error"] and m["error"]["code"]) for m in shown["merges"]] == [
        ("succeeded", None), ("failed", "worker_lost")]
