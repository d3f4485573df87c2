"""run_job's body, called directly against SQLite and PostgreSQL and a real store.

A tiny demo-gan and segmenter go through every phase; the tests check what a client
would: the status, the events, the four artifacts and their recorded hashes, and that
only the target layer changed in the rewritten checkpoint.
"""
import io
import json
import threading
import time
from dataclasses import replace
from datetime import timedelta

import pytest
from PIL import Image
from safetensors.torch import load as load_safetensors
from sqlalchemy import func, select

from job_fixtures import LAYER, copy_request, database_url, fast_params, make_world, save_generator, sha256, \
    tiny_model, world  # noqa: F401  (fixtures)
from rewriting.checkpoint import load_state
from rewriting.delta import EditDelta
from storage import lifecycle
from storage.db import session_scope
from storage.models import Artifact, Job, JobEvent, Statistic
from storage.objects import S3Store
from workers.jobs import process_job


def job_row(world, job_id) -> Job:
    with session_scope(world.session_factory) as session:
        return session.get(Job, job_id)


def artifacts(world, job_id) -> dict:
    with session_scope(world.session_factory) as session:
        return {a.name: a for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))}


def events(world, job_id) -> list:
    with session_scope(world.session_factory) as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
        return [(e.kind, e.status, e.phase) for e in rows]


def check_succeeded(world, job_id, base_path):
    job = job_row(world, job_id)
    assert (job.status, job.error_code, job.lease_owner) == ("succeeded", None, None)
    found = artifacts(world, job_id)
    assert set(found) == {"delta", "checkpoint", "preview", "metrics"}
    blobs = {}
    for name, artifact in found.items():
        data = world.read(artifact.object_key)
        assert (sha256(data), len(data)) == (artifact.sha256, artifact.size), name
        assert artifact.object_key == f"tenants/{job.tenant_id}/{name}/{artifact.sha256}/" + {
            "delta": "delta.safetensors", "checkpoint": "model.safetensors", "preview": "preview.png",
            "metrics": "metrics.json"}[name]
        blobs[name] = data

    # the rewritten checkpoint differs from the base in the target layer's weight only
    base, _ = load_state(base_path)
    edited = load_safetensors(blobs["checkpoint"])
    assert edited.keys() == base.keys()
    changed = sorted(k for k in base if not (base[k] == edited[k]).all())
    assert changed == [f"{LAYER}.conv.weight"]

    delta = EditDelta.from_bytes(blobs["delta"])
    assert (delta.layer, delta.param) == (LAYER, f"{LAYER}.conv.weight")
    metrics = json.loads(blobs["metrics"])
    assert metrics == job.metrics
    assert metrics["constraint_loss"] < metrics["initial_loss"]
    assert metrics["held_out_change"] > 0
    assert set(metrics["held_out_seeds"]).isdisjoint({1, 2, 3})
    assert set(metrics["segmenter"]) == {"source_class", "target_class", "source_pixels", "edit_success",
                                         "unwanted_pixel_change", "unwanted_feature_distance"}
    preview = Image.open(io.BytesIO(blobs["preview"]))
    assert preview.format == "PNG" and preview.height > 2 * 128 and preview.width > 4 * 128  # 2 rows, 4 columns
    return job, found


def test_job_runs_to_succeeded_with_four_artifacts(world, tiny_model):
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id)
    assert process_job(world.session_factory, world.store, world.settings, job_id) == "succeeded"
    job, _ = check_succeeded(world, job_id, tiny_model.path)
    assert job.phase == "uploading" and job.started_at <= job.finished_at

    transitions = [status for kind, status, _ in events(world, job_id) if kind == "transition"]
    assert transitions == ["queued", "running", "succeeded"]
    phases = [phase for kind, _, phase in events(world, job_id) if kind == "progress"]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == [
        "loading", "statistics", "optimizing", "evaluating", "uploading"]


def test_second_delivery_of_a_finished_job_does_nothing(world, tiny_model):
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id)
    assert process_job(world.session_factory, world.store, world.settings, job_id) == "succeeded"
    before = (events(world, job_id), {n: a.id for n, a in artifacts(world, job_id).items()})
    assert process_job(world.session_factory, world.store, world.settings, job_id) is None
    assert (events(world, job_id), {n: a.id for n, a in artifacts(world, job_id).items()}) == before
    assert job_row(world, job_id).attempts == 1


def test_job_on_s3_store(postgres_url, s3_server, s3_bucket, tmp_path):
    from workers.models import register_model_file

    world = make_world(postgres_url, S3Store(s3_bucket, "objects", endpoint_url=s3_server), tmp_path)
    tenant_id = world.tenant()
    path = save_generator(tmp_path / "generator.safetensors")
    model_id = register_model_file(world.session_factory, world.store, path, tenant_id=tenant_id, name="tiny")
    job_id = world.job(tenant_id, model_id)
    assert process_job(world.session_factory, world.store, world.settings, job_id) == "succeeded"
    found = artifacts(world, job_id)
    for artifact in found.values():
        assert sha256(world.read(artifact.object_key)) == artifact.sha256
    assert job_row(world, job_id).metrics["segmenter"] is None  # no segmenter: loss and change only


def test_job_reuses_an_existing_statistic(world, tiny_model):
    first = world.job(tiny_model.tenant_id, tiny_model.model_id)
    assert process_job(world.session_factory, world.store, world.settings, first) == "succeeded"
    other_tenant = world.tenant("other")  # statistics are shared across tenants: same bytes, same statistic
    from workers.models import register_model_file

    other_model = register_model_file(world.session_factory, world.store, tiny_model.path, tenant_id=other_tenant,
                                      name="same bytes")
    second = world.job(other_tenant, other_model, params=fast_params(steps=10))
    assert process_job(world.session_factory, world.store, world.settings, second) == "succeeded"

    with session_scope(world.session_factory) as session:
        model_sha = session.get(Job, first).metrics["statistic"]["id"]
        stats = session.scalars(select(Statistic).where(Statistic.id == model_sha)).all()
        same_key = session.scalar(select(func.count()).select_from(Statistic).where(
            Statistic.model_sha256 == stats[0].model_sha256))
    assert same_key == 1
    assert stats[0].fencing_token == 1  # its lease was granted once: computed once
    assert stats[0].status == "ready" and stats[0].count == 64 * 8 * 8  # 64 images, 8x8 keys each
    assert job_row(world, second).metrics["statistic"]["id"] == stats[0].id
    assert len(world.keys_under("shared/statistics")) == 1


def test_concurrent_jobs_compute_the_statistic_once(database_url, tmp_path, world, tiny_model):
    # one piece (no shards, see workers/statistics.py), of a few seconds, that the second job runs into
    world = make_world(database_url, world.store, tmp_path, shard_samples=100_000)
    params = fast_params(samples=100_000)
    jobs = [world.job(tiny_model.tenant_id, tiny_model.model_id, params=params) for _ in range(2)]
    results = {}

    def run(job_id, owner):
        results[job_id] = process_job(world.session_factory, world.store, world.settings, job_id, owner=owner)

    threads = [threading.Thread(target=run, args=(job_id, f"worker-{i}")) for i, job_id in enumerate(jobs)]
    threads[0].start()
    wait_for(lambda: job_row(world, jobs[0]).phase == "statistics")
    threads[1].start()  # the first job is computing the statistic now
    for t in threads:
        t.join(timeout=300)
    assert results == {jobs[0]: "succeeded", jobs[1]: "succeeded"}
    ids = {job_row(world, j).metrics["statistic"]["id"] for j in jobs}
    assert len(ids) == 1
    with session_scope(world.session_factory) as session:
        stat = session.get(Statistic, ids.pop())
        entered = [session.scalar(select(JobEvent.created_at).where(
            JobEvent.job_id == j, JobEvent.kind == "progress", JobEvent.phase == "statistics")) for j in jobs]
    assert (stat.status, stat.fencing_token, stat.count) == ("ready", 1, 100_000 * 64)
    # both jobs reached the statistics phase before it was ready: one computed, the other waited
    assert max(entered) < stat.updated_at
    assert len(world.keys_under("shared/statistics")) == 1


def wait_for(predicate, timeout=60.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def test_cancel_while_optimizing_ends_cancelled(world, tiny_model):
    # a very long optimization (no plateau stop): only the cancel can end it
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id,
                       params=fast_params(steps=1_000_000, plateau_patience=0))
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        status=process_job(world.session_factory, world.store, world.settings, job_id)))
    thread.start()
    wait_for(lambda: (job := job_row(world, job_id)).phase == "optimizing" and (job.progress_step or 0) > 0)
    with session_scope(world.session_factory) as session:
        lifecycle.request_cancel(session, job_id)
    cancelled_at = time.monotonic()
    thread.join(timeout=30)
    assert result == {"status": "cancelled"}
    assert time.monotonic() - cancelled_at < 5
    job = job_row(world, job_id)
    assert job.status == "cancelled" and job.phase == "optimizing"
    assert artifacts(world, job_id) == {}


def test_cancelled_queued_job_never_runs(world, tiny_model):
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id)
    with session_scope(world.session_factory) as session:
        lifecycle.request_cancel(session, job_id)
    assert process_job(world.session_factory, world.store, world.settings, job_id) is None
    job = job_row(world, job_id)
    assert (job.status, job.attempts, job.started_at) == ("cancelled", 0, None)


INVALID = [
    # (request change, params, layer, expected code, expected field at the start of the message)
    ({}, {"rank": 0}, LAYER, "invalid_request", "params.rank"),
    ({}, {"steps": "many"}, LAYER, "invalid_request", "params.steps"),
    ({}, {"samples": 0}, LAYER, "invalid_request", "params.samples"),
    ({}, {"held_out": 1000}, LAYER, "invalid_request", "params.held_out"),
    ({}, {"nonsense": 1}, LAYER, "invalid_request", "params.nonsense"),
    ({}, {"source_class": "volcano"}, LAYER, "invalid_request", "params.source_class"),
    ({"paste": {"seed": 2}}, {}, LAYER, "invalid_request", "paste.mask"),
    ({"operation": "paint"}, {}, LAYER, "invalid_request", "operation"),
    ({}, {}, "layer99", "unknown_layer", "'layer99' is not an editable layer"),
    ({}, {}, "up8", "unknown_layer", "'up8' is not an editable layer"),
    ({}, {}, "fc", "invalid_request", "layer: 'fc' has no spatial map"),
]


@pytest.mark.parametrize("change, params, layer, code, field", INVALID)
def test_invalid_job_fails_with_a_code_naming_the_field(world, tiny_model, change, params, layer, code, field):
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id, layer=layer,
                       request={**copy_request(), **change}, params=fast_params(**params))
    assert process_job(world.session_factory, world.store, world.settings, job_id) == "failed"
    job = job_row(world, job_id)
    assert job.error_code == code
    assert job.error_message.startswith(field)
    assert artifacts(world, job_id) == {}


def test_chained_job_edits_the_base_jobs_checkpoint(world, tiny_model):
    first = world.job(tiny_model.tenant_id, tiny_model.model_id)
    assert process_job(world.session_factory, world.store, world.settings, first) == "succeeded"
    base_checkpoint = artifacts(world, first)["checkpoint"]
    second = world.job(tiny_model.tenant_id, tiny_model.model_id, layer="layer4", base_job_id=first)
    assert process_job(world.session_factory, world.store, world.settings, second) == "succeeded"

    found = artifacts(world, second)
    delta = EditDelta.from_bytes(world.read(found["delta"].object_key))
    assert delta.base_sha256 == base_checkpoint.sha256
    before = load_safetensors(world.read(base_checkpoint.object_key))
    after = load_safetensors(world.read(found["checkpoint"].object_key))
    assert sorted(k for k in before if not (before[k] == after[k]).all()) == ["layer4.conv.weight"]
    original, _ = load_state(tiny_model.path)
    assert not (original[f"{LAYER}.conv.weight"] == after[f"{LAYER}.conv.weight"]).all()  # the first edit stays


def test_job_of_a_model_not_ready_fails(world, tiny_model):
    from storage.models import Model

    with session_scope(world.session_factory) as session:
        session.get(Model, tiny_model.model_id).status = "failed"
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id)
    assert process_job(world.session_factory, world.store, world.settings, job_id) == "failed"
    assert job_row(world, job_id).error_code == "model_not_ready"


def test_a_worker_whose_lease_was_taken_over_stops_without_writing(world, tiny_model):
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id,
                       params=fast_params(steps=1_000_000, plateau_patience=0))
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        status=process_job(world.session_factory, world.store, world.settings, job_id, owner="slow:1")))
    thread.start()
    wait_for(lambda: (job := job_row(world, job_id)).phase == "optimizing" and (job.progress_step or 0) > 0)
    # as if slow:1 had stalled past its lease: another worker takes the job over
    with session_scope(world.session_factory) as session:
        job = session.get(Job, job_id)
        later = job.lease_expires_at + timedelta(seconds=1)
        lease = lifecycle.claim(session, job_id, "thief:2", ttl=600, now=later)
    assert lease is not None and lease.token == 2
    thread.join(timeout=30)
    assert result == {"status": None}
    job = job_row(world, job_id)
    assert (job.status, job.lease_owner, job.fencing_token) == ("running", "thief:2", 2)
    assert artifacts(world, job_id) == {}


def test_a_handed_back_job_goes_on_from_its_optimizer_step(world, tiny_model):
    """A stopping worker (past its grace) saves where the optimizer stood; the next claim goes
    on from that step and ends with the artifacts of a run that never stopped, byte for byte."""
    from storage.models import DeletedObject
    from workers.heartbeat import ShutdownNotice

    params = fast_params(steps=4000, plateau_patience=0)
    whole_id = world.job(tiny_model.tenant_id, tiny_model.model_id, params=params)
    assert process_job(world.session_factory, world.store, world.settings, whole_id) == "succeeded"

    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id, params=params)
    notice, result = ShutdownNotice(), {}
    settings = replace(world.settings, worker_shutdown_grace_seconds=0)
    thread = threading.Thread(target=lambda: result.update(status=process_job(
        world.session_factory, world.store, settings, job_id, owner="stopping:1", shutdown=notice)))
    thread.start()
    wait_for(lambda: (job := job_row(world, job_id)).phase == "optimizing" and (job.progress_step or 0) > 0)
    notice.announce()
    thread.join(timeout=30)
    assert result == {"status": "queued"}
    job = job_row(world, job_id)
    assert (job.status, job.attempts) == ("queued", 0)
    key = job.resume_object_key
    assert key.startswith(f"tenants/{tiny_model.tenant_id}/resume/{job.resume_sha256}/")
    assert sha256(world.read(key)) == job.resume_sha256
    with session_scope(world.session_factory) as session:
        released = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.status == "queued")
                                   .order_by(JobEvent.seq.desc())).first()
    stopped_at = int(released.message.rsplit(" ", 1)[1])
    assert released.message.startswith("released by stopping:1: its worker was stopping") and 0 < stopped_at < 4000

    assert process_job(world.session_factory, world.store, world.settings, job_id) == "succeeded"
    job = job_row(world, job_id)
    assert job.metrics["resumed_from_step"] == stopped_at and job.metrics["steps"] == 4000
    assert (job.resume_object_key, job.resume_sha256) == (None, None)
    with session_scope(world.session_factory) as session:  # the state is the sweep's now
        assert session.get(DeletedObject, key) is not None
    optimizing = [e for e in events(world, job_id) if e[0] == "progress" and e[2] == "optimizing"]
    assert optimizing  # and the resumed run's first optimizing milestone names the step it went on from
    with session_scope(world.session_factory) as session:
        steps = list(session.scalars(select(JobEvent.step).where(
            JobEvent.job_id == job_id, JobEvent.kind == "progress", JobEvent.phase == "optimizing",
            JobEvent.seq > released.seq).order_by(JobEvent.seq)))
    assert steps[0] == stopped_at
    whole, resumed = artifacts(world, whole_id), artifacts(world, job_id)
    assert resumed["delta"].sha256 == whole["delta"].sha256
    assert resumed["checkpoint"].sha256 == whole["checkpoint"].sha256


@pytest.mark.parametrize("saved", ["unreadable", "another optimizer's"])
def test_a_saved_state_that_cannot_be_used_is_started_over(world, tiny_model, saved):
    """A state that is not one, or that another engine saved (here: of another method), is
    logged and the insert starts over; the job ends as one that never stopped."""
    import math

    import torch

    from rewriting.insert import InsertState
    from workers.artifacts import put_bytes

    params = fast_params(steps=50)
    whole_id = world.job(tiny_model.tenant_id, tiny_model.model_id, params=params)
    assert process_job(world.session_factory, world.store, world.settings, whole_id) == "succeeded"
    data = b"not a state" if saved == "unreadable" else InsertState(
        method="projected", directions=torch.zeros(1, 8), param=torch.zeros(1), adam={}, kept=math.inf,
        kept_lam=None, best=math.inf, best_step=0, losses=[0.5]).to_bytes()
    stored = put_bytes(world.session_factory, world.store, data, tiny_model.tenant_id, "resume", "state")
    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id, params=params,
                       resume_object_key=stored.key, resume_sha256=stored.sha256)
    assert process_job(world.session_factory, world.store, world.settings, job_id) == "succeeded"
    assert job_row(world, job_id).metrics["resumed_from_step"] == 0
    assert artifacts(world, job_id)["delta"].sha256 == artifacts(world, whole_id)["delta"].sha256


@pytest.mark.parametrize("patience", [0, 5])  # runs every step, or stops at a plateau
def test_a_job_handed_back_after_its_insert_does_not_optimize_again(world, tiny_model, patience):
    """Stopped while uploading, the job saves where its insert ended; the next claim runs no
    optimizer step and ends with the artifacts of a run that never stopped."""
    from workers.heartbeat import ShutdownNotice

    params = fast_params(steps=300, plateau_patience=patience, plateau_tolerance=0.05)
    whole_id = world.job(tiny_model.tenant_id, tiny_model.model_id, params=params)
    assert process_job(world.session_factory, world.store, world.settings, whole_id) == "succeeded"
    whole = job_row(world, whole_id)
    assert whole.metrics["stopped_early"] == (patience > 0)

    job_id = world.job(tiny_model.tenant_id, tiny_model.model_id, params=params)
    notice, result = ShutdownNotice(), {}
    # the uploading phase held open until the hand-back
    settings = replace(world.settings, worker_shutdown_grace_seconds=0, test_slow_upload_seconds=60)
    thread = threading.Thread(target=lambda: result.update(status=process_job(
        world.session_factory, world.store, settings, job_id, owner="stopping:1", shutdown=notice)))
    thread.start()
    wait_for(lambda: job_row(world, job_id).phase == "uploading")
    notice.announce()
    thread.join(timeout=30)
    assert result == {"status": "queued"}
    job = job_row(world, job_id)
    assert job.resume_object_key is not None and artifacts(world, job_id) == {}
    with session_scope(world.session_factory) as session:
        released = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.status == "queued")
                                   .order_by(JobEvent.seq.desc())).first()
    assert released.message.endswith(f"to go on from optimizer step {whole.metrics['steps']}")

    assert process_job(world.session_factory, world.store, world.settings, job_id) == "succeeded"
    job = job_row(world, job_id)
    assert job.metrics["resumed_from_step"] == whole.metrics["steps"]
    with session_scope(world.session_factory) as session:  # no optimizer step reported after the release
        steps = set(session.scalars(select(JobEvent.step).where(
            JobEvent.job_id == job_id, JobEvent.kind == "progress", JobEvent.phase == "optimizing",
            JobEvent.seq > released.seq)))
    assert steps == {whole.metrics["steps"]}
    resumed, whole = artifacts(world, job_id), artifacts(world, whole_id)
    for name in ("delta", "checkpoint", "preview"):  # metrics.json holds the seconds each took
        assert resumed[name].sha256 == whole[name].sha256, name


def test_demo_job_names_the_classes_it_measures(sqlite_url, tmp_path):
    """On the trained demo: the metrics find dome (source) and spire (target) from the boxes alone."""
    from demo.artifacts import GENERATOR_PATH, SEGMENTER_PATH
    from demo.examples import load_eval_requests
    from storage.objects import LocalStore
    from workers.models import register_demo

    if not (GENERATOR_PATH.exists() and SEGMENTER_PATH.exists()):
        pytest.skip("the demo weights are not trained yet")
    # the bundled pair's boxes, found with the segmenter in the shipped generator's images
    request = load_eval_requests("dome_to_spire")[0]
    world = make_world(sqlite_url, LocalStore(tmp_path / "objects"), tmp_path)
    job_id = world.job(world.tenant(), register_demo(world.session_factory, world.store), layer="layer4",
                       request=request, params={"samples": 100, "steps": 50, "held_out": 2})
    assert process_job(world.session_factory, world.store, world.settings, job_id) == "succeeded"
    metrics = job_row(world, job_id).metrics
    assert (metrics["segmenter"]["source_class"], metrics["segmenter"]["target_class"]) == ("dome", "spire")
    assert metrics["segmenter"]["source_pixels"] > 0 and metrics["constraint_loss"] < metrics["initial_loss"]
