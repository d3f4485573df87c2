"""A worker is told to stop (SIGTERM to its main process: a deploy, a Kubernetes pod
eviction) while its job is optimizing, or while it computes a shard of a statistic.

Celery's warm shutdown would wait for the job to end, however long it takes, and an
orchestrator SIGKILLs the worker after its grace period (30 s in Kubernetes); the job
would then wait for its lease to expire and for the reconciler. Instead the job goes on
for ``PALIMPSEST_WORKER_SHUTDOWN_GRACE_SECONDS``, then stops between optimizer steps,
releases its lease (``queued`` again) and sends its task again: the other worker takes it
at once, and the stopping worker exits within the grace plus a few seconds. A job that
ends within the grace simply ends where it runs. A statistic's shard is handed back the
same way: released with its moment so far, its claim given back, its task sent again, and
the worker that takes it goes on from the batch the stopping one had reached.

Real processes: PostgreSQL, its own Redis, `palimpsest serve`, two `palimpsest worker`
processes; no beat, so nothing here can come from the reconciler.
"""
import re
import signal
import time
from types import SimpleNamespace

import pytest

from faults import assert_one_artifact_set, fault_stack, now, seconds, warm_service
from stack import wait_until

pytestmark = pytest.mark.integration

GRACE_S = 4
# The stopping worker's exit: the grace, one poll of the notice (1 s) and one optimizer step,
# the release, then Celery's own warm shutdown (about 2.5 s measured on this 2-core machine).
EXIT_SLACK_S = 8
# Shards big enough that one takes well over the grace on one core (layer4 of the demo generator).
SHARD_SAMPLES = 12288


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with fault_stack(tmp_path_factory, "shutdown", PALIMPSEST_WORKER_SHUTDOWN_GRACE_SECONDS=str(GRACE_S),
                     PALIMPSEST_SHARD_SAMPLES=str(SHARD_SAMPLES)) as stack, \
            warm_service(stack, workers=2) as service:
        yield service


def submit_and_stop_its_worker(service, steps, group=False):
    """Submit a job and SIGTERM the main process (only; ``group``: every process of the
    worker's process group) of the worker running it, once it optimizes: (job as it was
    then, the worker, when, seconds until the worker exited)."""
    while len(service.workers) < 2:  # replace the worker the previous case stopped
        service.start_workers(1)
    job = service.wait_phase(service.submit(steps=steps), "optimizing")
    victim = service.worker_of(job)
    return (job, victim, *stop_worker(service, victim, group))


def stop_worker(service, victim, group=False):
    """SIGTERM the worker's main process (``group``: every process of its group) and wait for
    it to exit: (when, seconds until it exited)."""
    sent_at, start = now(), time.monotonic()
    if group:
        victim.terminate()
    else:
        victim.signal(signal.SIGTERM)
    victim.popen.wait(timeout=300)
    service.workers.remove(victim)
    return sent_at, time.monotonic() - start


@pytest.mark.parametrize("group", [False, True], ids=["main process", "process group"])
def test_a_stopping_worker_hands_its_job_to_the_other_worker(service, figures, group):
    # about 20 s of optimizing here: far past the grace. A SIGTERM to the whole group (systemd's
    # default KillMode, a supervisor's stopasgroup) also reaches the pool process running the job.
    job, victim, sent_at, exit_s = submit_and_stop_its_worker(service, steps=4000, group=group)
    job_id = job.id
    assert victim.popen.returncode == 0
    assert exit_s < GRACE_S + EXIT_SLACK_S, victim.log()[-3000:]

    final = service.wait_ended([job_id], timeout=300)[job_id]
    assert (final.status, final.error_code) == ("succeeded", None), final.error_message
    assert final.attempts == 1  # the hand-back gave its claim back: not a worker death

    events = service.events(job_id)
    transitions = [e for e in events if e.kind == "transition"]
    assert [e.status for e in transitions] == ["queued", "running", "queued", "running", "succeeded"]
    claimed, released, reclaimed = transitions[1], transitions[2], transitions[3]
    assert claimed.message == f"claimed by {job.lease_owner}"
    assert released.message.startswith(f"released by {job.lease_owner}: its worker was stopping")
    owner = reclaimed.message.removeprefix("claimed by ")
    assert reclaimed.message.startswith("claimed by ") and owner != job.lease_owner
    assert int(owner.rsplit(":", 1)[1]) in {p.pid for w in service.workers for p in w.tree()}  # the other worker
    # it ran on through the grace, and was handed back soon after it
    assert GRACE_S <= seconds(sent_at, released.created_at) < GRACE_S + 4
    # taken at once: no lease to expire (6 s here), no reconciler (none runs)
    assert seconds(released.created_at, reclaimed.created_at) < 3
    assert not [e for e in events if e.message and e.message.startswith("reconciler")]
    # the released job wrote nothing more: every later progress event is the new owner's run
    assert [e.phase for e in events if e.kind == "progress" and e.seq > reclaimed.seq][0] == "loading"
    # which went on from the optimizer step the stopping worker had reached
    stopped_at = int(released.message.rsplit(" ", 1)[1])
    assert released.message.endswith(f", to go on from optimizer step {stopped_at}") and stopped_at > 0
    assert [e.step for e in events if e.phase == "optimizing" and e.seq > reclaimed.seq][0] == stopped_at
    assert final.metrics["resumed_from_step"] == stopped_at < final.metrics["steps"] <= 4000
    # the stopping worker was optimizing when it stopped
    assert any(e.kind == "progress" and e.phase == "optimizing" and e.seq < released.seq for e in events)
    assert_one_artifact_set(service, job_id)

    figures.update(grace_s=GRACE_S, sigterm_to_exit_s=round(exit_s, 2),
                   sigterm_to_released_s=seconds(sent_at, released.created_at),
                   sigterm_to_reclaimed_s=seconds(sent_at, reclaimed.created_at),
                   sigterm_to_succeeded_s=seconds(sent_at, final.finished_at), resumed_from_step=stopped_at)


def test_a_job_that_ends_within_the_grace_ends_on_its_worker(service, figures):
    # about 2 s of optimizing: ends within the grace
    job, victim, sent_at, exit_s = submit_and_stop_its_worker(service, steps=300)
    job_id = job.id
    assert victim.popen.returncode == 0
    assert exit_s < GRACE_S + EXIT_SLACK_S

    final = service.job(job_id)  # ended before its worker exited
    assert (final.status, final.attempts) == ("succeeded", 1)
    transitions = service.transitions(job_id)
    assert [e.status for e in transitions] == ["queued", "running", "succeeded"]
    assert transitions[1].message == f"claimed by {job.lease_owner}"
    assert_one_artifact_set(service, job_id)
    figures.update(grace_s=GRACE_S, sigterm_to_exit_s=round(exit_s, 2),
                   sigterm_to_succeeded_s=seconds(sent_at, final.finished_at))


def test_a_stopping_worker_hands_its_statistic_shard_to_the_other_worker(service, figures):
    from sqlalchemy import select

    from storage.models import Statistic, StatisticShard

    while len(service.workers) < 2:
        service.start_workers(1)
    # two shards: the statistic's own task computes one, the other worker the other
    stat_id = service.client.request("POST", "/v1/statistics", json={
        "model": service.model_id, "layer": "layer4", "samples": 2 * SHARD_SAMPLES}).json()["id"]

    def computing():
        with service.session() as session:
            shards = list(session.scalars(select(StatisticShard).where(StatisticShard.statistic_id == stat_id)
                                          .order_by(StatisticShard.number)))
        held = [s for s in shards if s.status == "computing" and s.lease_owner]
        return held[0] if held else None

    shard = wait_until(computing, 120, interval=0.1, what="a shard computing")
    victim = service.worker_of(shard)
    sent_at, exit_s = stop_worker(service, victim)
    assert victim.popen.returncode == 0
    assert exit_s < GRACE_S + EXIT_SLACK_S, victim.log()[-3000:]
    assert "handed back (the worker is stopping)" in victim.log()

    def ready():
        with service.session() as session:
            stat = session.get(Statistic, stat_id)
            assert stat.status in ("pending", "computing", "ready"), (stat.status, stat.error)
            return stat if stat.status == "ready" else None

    stat = wait_until(ready, 300, interval=0.25, what=f"{stat_id} ready")
    with service.session() as session:
        shards = {s.id: s for s in session.scalars(select(StatisticShard).where(
            StatisticShard.statistic_id == stat_id))}
    assert stat.count == sum(s.count for s in shards.values())
    # the handed-back claim was given back: one claim counted, by the worker that finished it
    assert shards[shard.id].attempts == 1
    assert all(s.status == "ready" for s in shards.values())
    # and the other worker went on from the batch the stopping one had reached
    resumed = re.search(rf"{shard.id}: going on from image (\d+) of {SHARD_SAMPLES}", service.workers[0].log())
    assert resumed and 0 < int(resumed.group(1)) < SHARD_SAMPLES, service.workers[0].log()[-3000:]
    assert shards[shard.id].resume_object_key is None
    figures.update(grace_s=GRACE_S, sigterm_to_exit_s=round(exit_s, 2),
                   sigterm_to_ready_s=seconds(sent_at, stat.updated_at), resumed_from_image=int(resumed.group(1)),
                   shard_images=SHARD_SAMPLES)


def test_a_stopping_worker_hands_its_merge_to_the_other_worker(service, figures, tmp_path):
    import copy
    import json

    from sqlalchemy import select

    from faults import DEMO_REQUEST, QUICK
    from storage.models import Batch, BatchMerge

    while len(service.workers) < 2:
        service.start_workers(1)
    request = json.loads(DEMO_REQUEST.read_text())
    layer = request.pop("layer")
    other = copy.deepcopy(request)
    other["paste"]["seed"] = other["context"][0]["seed"] = 7
    # a merge optimizes every step its members asked for (no plateau stop): well past the grace
    params = {**QUICK, "steps": 4000, "plateau_patience": 0}
    lines = [{"custom_id": f"rule-{i}", "model": service.model_id, "layer": layer, "request": r, "params": params}
             for i, r in enumerate([request, other])]
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    received = {w.pid: w.log().count("workers.merge.merge_batch") for w in service.workers}
    batch_id = service.client.submit_batch(tmp_path / "edits.jsonl", merge=True)["id"]

    def batch():
        with service.session() as session:
            return session.get(Batch, batch_id)

    def merging():  # the worker whose log received the merge, once its delivery is under way
        if batch().delivered_at is None:
            return None
        return next((w for w in service.workers if w.log().count("workers.merge.merge_batch") > received[w.pid]),
                    None)

    victim = wait_until(merging, 300, interval=0.1, what=f"{batch_id} merging")
    time.sleep(1)  # into its optimization
    sent_at, exit_s = stop_worker(service, victim)
    assert victim.popen.returncode == 0
    assert exit_s < GRACE_S + EXIT_SLACK_S, victim.log()[-3000:]
    handed = re.search(rf"batch {batch_id}: merge handed back \(the worker is stopping\), to go on from "
                       r"optimizer step (\d+)", victim.log())
    assert handed, victim.log()[-3000:]

    def completed():
        row = batch()
        assert row.status == "finalizing" or row.status == "completed", (row.status, row.error_message)
        return row if row.status == "completed" else None

    done = wait_until(completed, 300, interval=0.25, what=f"{batch_id} completed")
    with service.session() as session:
        (merge,) = session.scalars(select(BatchMerge).where(BatchMerge.batch_id == batch_id)).all()
    assert (merge.status, merge.rules) == ("succeeded", 2)
    # the other worker went on from the step the stopping one saved, and ran the rest
    assert merge.report["resumed_from_step"] == int(handed.group(1)) > 0 and merge.report["steps"] == 4000
    assert done.deliveries == 1 and done.resume_object_key is None  # the handed-back delivery was given back
    figures.update(grace_s=GRACE_S, sigterm_to_exit_s=round(exit_s, 2),
                   sigterm_to_completed_s=seconds(sent_at, done.finished_at),
                   resumed_from_step=merge.report["resumed_from_step"])


def test_an_idle_worker_stops_at_once_on_a_group_sigterm(service, figures):
    # its pool process ran a job, so it holds the handler that waits for the main process
    while len(service.workers) < 2:
        service.start_workers(1)
    job_id = service.submit(steps=50)
    assert service.wait_ended([job_id], timeout=120)[job_id].status == "succeeded"
    owner = service.transitions(job_id)[1].message.removeprefix("claimed by ")  # its lease is gone
    victim = service.worker_of(SimpleNamespace(lease_owner=owner))
    start = time.monotonic()
    victim.terminate()
    victim.popen.wait(timeout=60)
    exit_s = time.monotonic() - start
    service.workers.remove(victim)
    assert victim.popen.returncode == 0
    assert exit_s < GRACE_S, victim.log()[-3000:]  # nothing to hand back: no grace to wait for
    figures.update(sigterm_to_exit_s=round(exit_s, 2))


def test_a_cold_shutdown_still_stops_the_running_job_at_once(service, figures):
    # SIGQUIT: Celery cancels the running task with a SIGTERM to its pool process, which must
    # not take it for a group's SIGTERM and wait out the grace
    while len(service.workers) < 2:
        service.start_workers(1)
    job = service.wait_phase(service.submit(steps=4000), "optimizing")
    victim = service.worker_of(job)
    start = time.monotonic()
    victim.signal(signal.SIGQUIT)
    victim.popen.wait(timeout=60)
    exit_s = time.monotonic() - start
    service.workers.remove(victim)
    # 3.4-3.9 s here (the pool process waits up to 1 s for a warm shutdown, then Celery's own
    # cold shutdown); one that waited out the grace would hand the job back and exit after 7-8 s
    assert exit_s < GRACE_S + 2, victim.log()[-3000:]
    assert "released by" not in " ".join(e.message or "" for e in service.transitions(job.id))
    figures.update(sigquit_to_exit_s=round(exit_s, 2))
