"""merge_batch's body: a finalizing merged batch's succeeded members, grouped by (model,
layer), solved jointly; merged delta, checkpoint and report uploaded and recorded; the
batch completed. Real database and store, real jobs run first."""
import json

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import delete, select

from job_fixtures import LAYER, database_url, fast_params, tiny_model, world  # noqa: F401  (fixtures)
from rewriting.checkpoint import file_sha256
from rewriting.delta import EditDelta
from storage.db import session_scope
from storage.models import Artifact, Batch, BatchMerge, Job, Model
from workers.batches import set_status
from workers.cache import WorkerCache
from workers.celery_app import TASK_ROUTES
from workers.jobs import process_job
from workers.merge import process_merge


def copy_between(source, target):
    return {"operation": "copy", "copy": {"seed": source, "mask": [0.0, 0.0, 0.5, 0.5]},
            "paste": {"seed": target, "mask": [0.5, 0.5, 1.0, 1.0]},
            "context": [{"seed": target, "mask": [0.5, 0.5, 1.0, 1.0]}]}


def erase(seed):
    return {"operation": "erase", "paste": {"seed": seed, "mask": [0.25, 0.25, 0.75, 0.75]},
            "context": [{"seed": seed, "mask": [0.25, 0.25, 0.75, 0.75]}], "params": {"drank": 3}}


class Batches:
    def __init__(self, world, tiny):
        self.world, self.tiny = world, tiny
        self.warm = WorkerCache(2, 4)

    def create(self, members, merge=True, **params):
        """A batch of ``members`` [(custom_id, layer, request)], each run by a worker (``params``
        over the fast ones), then finalizing."""
        world = self.world
        with session_scope(world.session_factory) as session:
            batch = Batch(tenant_id=self.tiny.tenant_id, status="in_progress", merge=merge, total_count=len(members))
            session.add(batch)
            session.flush()
            batch_id = batch.id
        jobs = [world.job(self.tiny.tenant_id, self.tiny.model_id, layer=layer, request=request,
                          params=fast_params(**{"steps": 60, **params}), batch_id=batch_id, custom_id=custom_id)
                for custom_id, layer, request in members]
        for job_id in jobs:
            process_job(world.session_factory, world.store, world.settings, job_id, warm=self.warm)
        with session_scope(world.session_factory) as session:
            assert set_status(session, batch_id, "in_progress", "finalizing")
        return batch_id, jobs

    def merge(self, batch_id, settings=None, shutdown=None):
        return process_merge(self.world.session_factory, self.world.store, settings or self.world.settings,
                             batch_id, warm=self.warm, shutdown=shutdown)

    def merges(self, batch_id):
        with session_scope(self.world.session_factory) as session:
            return session.scalars(select(BatchMerge).where(BatchMerge.batch_id == batch_id)
                                   .order_by(BatchMerge.layer)).all()


@pytest.fixture
def batches(world, tiny_model):  # noqa: F811
    return Batches(world, tiny_model)


MEMBERS = [("dome-1", LAYER, copy_between(1, 2)), ("dome-2", LAYER, copy_between(5, 6)),
           ("erase-7", LAYER, erase(7))]


def test_merge_batch_solves_the_members_jointly_and_completes_the_batch(world, tiny_model, batches):  # noqa: F811
    batch_id, jobs = batches.create(MEMBERS)
    assert batches.merge(batch_id) == "completed"
    (row,) = batches.merges(batch_id)
    with session_scope(world.session_factory) as session:
        model = session.get(Model, tiny_model.model_id)
        members = {j.id: j for j in session.scalars(select(Job).where(Job.batch_id == batch_id))}
        alone = {a.job_id: a for a in session.scalars(select(Artifact).where(Artifact.name == "delta",
                                                                             Artifact.job_id.in_(jobs)))}
    assert {j.status for j in members.values()} == {"succeeded"}
    assert (row.status, row.rules, row.layer, row.model_id, row.model_sha256) == (
        "succeeded", 3, LAYER, model.id, model.sha256)

    # the report: each rule's loss merged next to its loss alone (= its job's own constraint loss)
    report = json.loads(world.read(row.report_object_key))
    assert report == row.report and report["batch"] == batch_id and report["rules"] == 3
    assert [r["custom_id"] for r in report["per_rule"]] == ["dome-1", "dome-2", "erase-7"]
    for entry in report["per_rule"]:
        job = members[entry["job"]]
        assert entry["alone_loss"] == pytest.approx(job.metrics["constraint_loss"], rel=1e-4)
        assert entry["initial_loss"] == pytest.approx(job.metrics["initial_loss"], rel=1e-4)
        assert entry["merged_loss"] < entry["initial_loss"]

    # the merged delta spans every member's directions; the checkpoint is the base with it
    prefix = f"tenants/{tiny_model.tenant_id}/"
    assert all(getattr(row, f"{n}_object_key").startswith(prefix) for n in ("delta", "checkpoint", "report"))
    delta = EditDelta.from_bytes(world.read(row.delta_object_key))
    ranks = [EditDelta.from_bytes(world.read(alone[j].object_key)).rank for j in jobs]
    assert delta.rank == row.rank == sum(ranks) and delta.base_sha256 == model.sha256
    assert delta.config["merge"] == ["dome-1", "dome-2", "erase-7"]
    path = world.tmp_path / "merged.safetensors"
    path.write_bytes(world.read(row.checkpoint_object_key))
    assert file_sha256(path) == row.checkpoint_sha256 and path.stat().st_size == row.checkpoint_size
    base, merged = load_file(tiny_model.path), load_file(path)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed == [delta.param]
    want = (base[delta.param].double() + delta.update()).to(base[delta.param].dtype)
    assert torch.equal(merged[delta.param], want)

    with session_scope(world.session_factory) as session:
        batch = session.get(Batch, batch_id)
    assert (batch.status, batch.succeeded_count) == ("completed", 3)


def test_a_closed_form_merge_fits_every_rule_in_the_members_statistics_metric(world, batches):
    # two rank-2 rules on the 3x3 conv: 36 unknowns a channel over the union against 32
    # pasted cells, so the joint solve meets both exactly, in the metric of their statistic
    batch_id, jobs = batches.create([("a", "layer3.conv", copy_between(1, 2)), ("b", "layer3.conv", copy_between(5, 6))],
                                    method="closed_form", rank=2, loss="mse", halo=True)
    assert batches.merge(batch_id) == "completed"
    (row,) = batches.merges(batch_id)
    with session_scope(world.session_factory) as session:
        used = {session.get(Job, j).metrics["statistic"]["id"] for j in jobs}
    assert row.status == "succeeded" and row.rank == 4
    assert [row.report["statistic"]] == list(used) and row.report["config"]["method"] == "closed_form"
    for entry in row.report["per_rule"]:
        assert entry["merged_loss"] < 1e-6 * entry["initial_loss"]


def test_a_closed_form_merge_of_one_member_gives_back_its_own_update(world, batches):
    # Only the least change in the member's C metric is the member's own update (the least
    # Euclidean change is another weight: tests/engine/test_merge.py), so this fails if the
    # worker does not hand the merge its statistic.
    batch_id, (job_id,) = batches.create([("a", "layer3.conv", copy_between(1, 2))],
                                         method="closed_form", rank=2, loss="mse", halo=True)
    assert batches.merge(batch_id) == "completed"
    (row,) = batches.merges(batch_id)
    with session_scope(world.session_factory) as session:
        (own,) = session.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == "delta")).all()
    alone = EditDelta.from_bytes(world.read(own.object_key)).update(torch.float64)
    merged = EditDelta.from_bytes(world.read(row.delta_object_key)).update(torch.float64)
    assert torch.allclose(merged, alone, rtol=1e-4, atol=1e-6 * alone.abs().max())


def test_members_are_grouped_by_layer(batches):
    batch_id, _ = batches.create([("a", "layer3", copy_between(1, 2)), ("b", "layer4", copy_between(1, 2)),
                                  ("c", "layer4", copy_between(5, 6))])
    assert batches.merge(batch_id) == "completed"
    rows = batches.merges(batch_id)
    assert [(r.layer, r.rules, r.status) for r in rows] == [("layer3", 1, "succeeded"), ("layer4", 2, "succeeded")]
    assert rows[0].delta_sha256 != rows[1].delta_sha256


def test_merge_batch_is_safe_to_run_twice_and_skips_merged_groups(world, batches, monkeypatch):
    batch_id, _ = batches.create([("a", "layer3", copy_between(1, 2)), ("b", "layer4", copy_between(1, 2))])
    import workers.merge

    real, calls = workers.merge.merge_group, []
    monkeypatch.setattr(workers.merge, "merge_group", lambda *a, **k: calls.append(a[4][0].job.layer) or real(*a, **k))
    # a first delivery merged layer3, then died before completing the batch
    with session_scope(world.session_factory) as session:
        assert set_status(session, batch_id, "finalizing", "completed")
    assert batches.merge(batch_id) == "completed" and calls == []  # not finalizing: nothing done
    with session_scope(world.session_factory) as session:
        session.get(Batch, batch_id).status = "finalizing"
    assert batches.merge(batch_id) == "completed" and calls == ["layer3", "layer4"]
    rows = batches.merges(batch_id)
    with session_scope(world.session_factory) as session:
        session.execute(delete(BatchMerge).where(BatchMerge.layer == "layer4", BatchMerge.batch_id == batch_id))
        session.get(Batch, batch_id).status = "finalizing"
    calls.clear()
    assert batches.merge(batch_id) == "completed" and calls == ["layer4"]  # layer3 kept as it was
    again = batches.merges(batch_id)
    assert again[0].id == rows[0].id
    # the same update again (the delta's identity: safetensors files order metadata keys at random)
    identity = lambda row: EditDelta.from_bytes(world.read(row.delta_object_key)).sha256  # noqa: E731
    assert identity(again[1]) == identity(rows[1])


def test_a_handed_back_merge_goes_on_from_its_optimizer_step(world, batches):
    """A stopping worker (past its grace) stops the merge between steps, saves the group's
    optimizer state on the batch and gives the delivery back; the next delivery goes on
    from that step and merges what a merge that never stopped merges."""
    import threading
    import time
    from dataclasses import replace

    from storage.models import DeletedObject
    from workers.heartbeat import ShutdownNotice
    from workers.statistics import HANDED_BACK

    members = MEMBERS[:2]
    params = dict(steps=4000, plateau_patience=0)  # the merge takes the members' steps
    whole_id, _ = batches.create(members, **params)
    assert batches.merge(whole_id) == "completed"
    batch_id, _ = batches.create(members, **params)
    notice, result = ShutdownNotice(), {}
    settings = replace(world.settings, worker_shutdown_grace_seconds=0)
    thread = threading.Thread(target=lambda: result.update(status=batches.merge(batch_id, settings, notice)))
    thread.start()
    time.sleep(1.5)  # into the optimization
    notice.announce()
    thread.join(timeout=60)
    assert result == {"status": HANDED_BACK} and batches.merges(batch_id) == []
    with session_scope(world.session_factory) as session:
        batch = session.get(Batch, batch_id)
        assert (batch.status, batch.deliveries) == ("finalizing", 0)  # the delivery was given back
    state_key = batch.resume_object_key
    assert state_key.startswith(f"tenants/{batch.tenant_id}/resume/")
    from rewriting.insert import InsertState

    stopped_at = InsertState.from_bytes(world.read(state_key)).step
    assert 0 < stopped_at < 4000  # part-way

    assert batches.merge(batch_id) == "completed"
    (resumed,), (whole,) = batches.merges(batch_id), batches.merges(whole_id)
    assert resumed.report["steps"] == whole.report["steps"] == 4000
    assert (resumed.report["resumed_from_step"], whole.report["resumed_from_step"]) == (stopped_at, 0)
    identity = lambda row: EditDelta.from_bytes(world.read(row.delta_object_key)).sha256  # noqa: E731
    assert identity(resumed) == identity(whole)
    with session_scope(world.session_factory) as session:
        assert session.get(Batch, batch_id).resume_object_key is None
        assert session.get(DeletedObject, state_key) is not None  # for the sweep


def test_only_succeeded_members_are_merged(world, batches):
    batch_id, jobs = batches.create(MEMBERS)
    with session_scope(world.session_factory) as session:  # one member had failed
        session.get(Job, jobs[1]).status = "failed"
    assert batches.merge(batch_id) == "completed"
    (row,) = batches.merges(batch_id)
    assert row.rules == 2 and [r["custom_id"] for r in row.report["per_rule"]] == ["dome-1", "erase-7"]


def test_a_group_that_cannot_be_merged_is_recorded_failed(world, batches):
    batch_id, jobs = batches.create(MEMBERS[:2])
    with session_scope(world.session_factory) as session:
        session.execute(delete(Artifact).where(Artifact.job_id == jobs[0], Artifact.name == "delta"))
    assert batches.merge(batch_id) == "completed"  # the members' results stand; the merge says why not
    (row,) = batches.merges(batch_id)
    assert (row.status, row.error_code, row.delta_object_key) == ("failed", "incompatible", None)
    assert jobs[0] in row.error_message


def test_a_batch_without_merge_is_left_alone(world, batches):
    batch_id, _ = batches.create(MEMBERS[:1], merge=False)
    assert batches.merge(batch_id) == "finalizing" and batches.merges(batch_id) == []


def test_merge_batch_runs_on_the_gpu_queue():
    assert TASK_ROUTES["workers.merge.merge_batch"] == {"queue": "gpu"}
