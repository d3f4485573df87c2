"""DELETE /v1/jobs/{id}, /v1/batches/{id} and /v1/models/{id}: rows go at once, objects after
the deletion grace period (the reconciler's sweep), and what others depend on is refused
with a 409 that names them, deleting nothing."""
import io
from datetime import timedelta

import pytest
from sqlalchemy import select

from storage import deletion
from storage.models import Artifact, Batch, BatchMerge, DeletedObject, Job, JobEvent, Model, utcnow
from storage.objects import ObjectNotFound
from v1_helpers import (  # noqa: F401
    EDIT, add_artifact, add_job, add_model, alice, app, bob, client, config, sessions,
)


def sweep(app, later: float = 0):
    """The reconciler's sweep, ``later`` seconds past the grace period."""
    grace = app.config["PALIMPSEST_DELETION_GRACE_SECONDS"]
    return deletion.sweep(app.extensions["palimpsest_db"].session_factory, app.extensions["palimpsest_store"],
                          grace, now=utcnow() + timedelta(seconds=grace + later + 1))


def stored(app, key: str) -> bool:
    try:
        app.extensions["palimpsest_store"].open(key).close()
        return True
    except ObjectNotFound:
        return False


def keys_of(app, job_id: str) -> list[str]:
    with sessions(app) as session:
        return list(session.scalars(select(Artifact.object_key).where(Artifact.job_id == job_id)))


@pytest.fixture
def model(app, alice):
    return add_model(app, alice.id)


def test_an_ended_job_goes_with_its_events_and_then_its_objects(app, client, alice, model):
    job = add_job(app, alice.id, model, "succeeded")
    add_artifact(app, job, "checkpoint", b"weights")
    add_artifact(app, job, "metrics", b"{}", content_type="application/json")
    keys = keys_of(app, job)

    response = client.delete(f"/v1/jobs/{job}", headers=alice.headers)
    assert response.status_code == 204 and response.get_data() == b""
    assert client.get(f"/v1/jobs/{job}", headers=alice.headers).status_code == 404
    assert client.get(f"/v1/jobs/{job}/artifacts/checkpoint", headers=alice.headers).status_code == 404
    assert client.delete(f"/v1/jobs/{job}", headers=alice.headers).status_code == 404
    with sessions(app) as session:
        assert session.scalars(select(JobEvent).where(JobEvent.job_id == job)).all() == []
        assert session.scalars(select(Artifact).where(Artifact.job_id == job)).all() == []
        assert set(session.scalars(select(DeletedObject.object_key))) == set(keys)

    # within the grace period the objects stay (a worker may be about to name them again)
    assert sweep(app, later=-60)["objects"] == 0
    assert all(stored(app, key) for key in keys)
    assert sweep(app)["objects"] == 2
    assert not any(stored(app, key) for key in keys)
    with sessions(app) as session:
        assert session.scalars(select(DeletedObject)).all() == []


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_failed_and_cancelled_jobs_can_be_deleted(app, client, alice, model, status):
    job = add_job(app, alice.id, model, status)
    assert client.delete(f"/v1/jobs/{job}", headers=alice.headers).status_code == 204


@pytest.mark.parametrize("status", ["queued", "running"])
def test_a_job_under_way_is_409_and_stays(app, client, alice, model, status):
    job = add_job(app, alice.id, model, status)
    response = client.delete(f"/v1/jobs/{job}", headers=alice.headers)
    assert response.status_code == 409
    assert response.json["error"]["code"] == "job_not_finished"
    assert f"/v1/jobs/{job}/cancel" in response.json["error"]["message"]
    assert client.get(f"/v1/jobs/{job}", headers=alice.headers).json["status"] == status


def test_another_tenants_job_is_404(app, client, alice, bob, model):
    job = add_job(app, alice.id, model, "succeeded")
    assert client.delete(f"/v1/jobs/{job}", headers=bob.headers).status_code == 404
    assert client.get(f"/v1/jobs/{job}", headers=alice.headers).status_code == 200


def test_a_base_goes_after_the_jobs_chained_on_it(app, client, alice, model):
    base = add_job(app, alice.id, model, "succeeded")
    chained = add_job(app, alice.id, model, "succeeded", base_job_id=base)
    response = client.delete(f"/v1/jobs/{base}", headers=alice.headers)
    assert response.status_code == 409
    assert response.json["error"]["code"] == "in_use"
    assert chained in response.json["error"]["message"]
    assert client.delete(f"/v1/jobs/{chained}", headers=alice.headers).status_code == 204
    assert client.delete(f"/v1/jobs/{base}", headers=alice.headers).status_code == 204


def test_a_shared_object_stays_while_another_job_names_it(app, client, alice, model):
    first, second = (add_job(app, alice.id, model, "succeeded") for _ in range(2))
    add_artifact(app, first, "delta", b"same bytes")
    add_artifact(app, second, "delta", b"same bytes")  # content-addressed: one object
    (key,) = keys_of(app, first)
    assert client.delete(f"/v1/jobs/{first}", headers=alice.headers).status_code == 204
    assert sweep(app) == {"statistics": 0, "objects": 0, "kept": 1}
    assert stored(app, key)
    assert client.get(f"/v1/jobs/{second}/artifacts/delta", headers=alice.headers).get_data() == b"same bytes"
    assert client.delete(f"/v1/jobs/{second}", headers=alice.headers).status_code == 204
    assert sweep(app)["objects"] == 1
    assert not stored(app, key)


def test_an_object_written_again_before_the_sweep_is_kept(app, client, alice, model):
    job = add_job(app, alice.id, model, "succeeded")
    add_artifact(app, job, "preview", b"png")
    (key,) = keys_of(app, job)
    assert client.delete(f"/v1/jobs/{job}", headers=alice.headers).status_code == 204
    # a worker about to put the same bytes for another job revives the key first
    with sessions(app) as session:
        deletion.revive(session, key)
    assert sweep(app)["objects"] == 0
    assert stored(app, key)


def add_batch(app, tenant_id: str, model_id: str, status: str, members: int = 2) -> tuple[str, list[str]]:
    key = f"tenants/{tenant_id}/batches/{status}/input.jsonl"
    app.extensions["palimpsest_store"].put(key, io.BytesIO(b"{}\n"))
    with sessions(app) as session:
        batch = Batch(tenant_id=tenant_id, status=status, total_count=members, input_object_key=key)
        session.add(batch)
        session.flush()
        batch_id = batch.id
    jobs = [add_job(app, tenant_id, model_id, "succeeded", batch_id=batch_id, custom_id=f"c{n}")
            for n in range(members)]
    return batch_id, jobs


def test_an_ended_batch_goes_with_its_members_merges_and_input(app, client, alice, model):
    batch, members = add_batch(app, alice.id, model, "completed")
    add_artifact(app, members[0], "checkpoint", b"member weights")
    # a member chained on another member of the same batch
    chained = add_job(app, alice.id, model, "succeeded", batch_id=batch, custom_id="c9", base_job_id=members[1])
    with sessions(app) as session:
        session.add(BatchMerge(batch_id=batch, model_id=model, model_sha256="0" * 64, layer="layer3",
                               status="succeeded", rules=2, delta_object_key="tenants/x/delta/m/delta.safetensors"))
        input_key = session.get(Batch, batch).input_object_key

    # a member cannot go alone
    response = client.delete(f"/v1/jobs/{members[0]}", headers=alice.headers)
    assert (response.status_code, response.json["error"]["code"]) == (409, "in_use")
    assert batch in response.json["error"]["message"]

    assert client.delete(f"/v1/batches/{batch}", headers=alice.headers).status_code == 204
    assert client.get(f"/v1/batches/{batch}", headers=alice.headers).status_code == 404
    with sessions(app) as session:
        assert session.scalars(select(Job).where(Job.id.in_([*members, chained]))).all() == []
        assert session.scalars(select(BatchMerge).where(BatchMerge.batch_id == batch)).all() == []
        assert {input_key, "tenants/x/delta/m/delta.safetensors"} <= set(session.scalars(
            select(DeletedObject.object_key)))
    sweep(app)
    assert not stored(app, input_key)


def test_a_batch_under_way_is_409(app, client, alice, model):
    batch, _ = add_batch(app, alice.id, model, "in_progress")
    response = client.delete(f"/v1/batches/{batch}", headers=alice.headers)
    assert (response.status_code, response.json["error"]["code"]) == (409, "batch_not_finished")


def test_a_batch_whose_member_is_a_base_outside_it_is_409(app, client, alice, model):
    batch, members = add_batch(app, alice.id, model, "completed")
    outside = add_job(app, alice.id, model, "queued", base_job_id=members[0])
    response = client.delete(f"/v1/batches/{batch}", headers=alice.headers)
    assert (response.status_code, response.json["error"]["code"]) == (409, "in_use")
    assert outside in response.json["error"]["message"]
    assert client.get(f"/v1/batches/{batch}", headers=alice.headers).status_code == 200


def test_a_model_goes_once_no_job_names_it(app, client, alice, bob, model):
    job = add_job(app, alice.id, model, "succeeded")
    assert client.delete(f"/v1/models/{model}", headers=bob.headers).status_code == 404
    response = client.delete(f"/v1/models/{model}", headers=alice.headers)
    assert (response.status_code, response.json["error"]["code"]) == (409, "in_use")
    assert f"/v1/jobs?model={model}" in response.json["error"]["message"]

    assert client.delete(f"/v1/jobs/{job}", headers=alice.headers).status_code == 204
    with sessions(app) as session:
        key = session.get(Model, model).object_key
    assert client.delete(f"/v1/models/{model}", headers=alice.headers).status_code == 204
    assert client.get(f"/v1/models/{model}", headers=alice.headers).status_code == 404
    with sessions(app) as session:
        assert session.get(DeletedObject, key) is not None
    # a submission on it now names the field, although this process had it cached as ready
    response = client.post("/v1/jobs", json={"model": model, "layer": "layer3", "request": EDIT},
                           headers=alice.headers)
    assert response.status_code == 422 and response.json["error"]["field"] == "model"


def test_a_shared_model_is_403(app, client, alice):
    shared = add_model(app, None)
    response = client.delete(f"/v1/models/{shared}", headers=alice.headers)
    assert (response.status_code, response.json["error"]["code"]) == (403, "forbidden")


def test_a_model_deleted_through_another_api_process_is_422_not_500(app, client, alice, model):
    body = {"model": model, "layer": "layer3", "request": EDIT}
    assert client.post("/v1/jobs", json=body, headers=alice.headers).status_code == 202  # now cached as ready
    with sessions(app) as session:  # what another process's DELETE leaves: no row, this cache untouched
        session.execute(Job.__table__.delete().where(Job.model_id == model))
        session.execute(Model.__table__.delete().where(Model.id == model))
    response = client.post("/v1/jobs", json=body, headers=alice.headers)
    assert response.status_code == 422, response.json
    assert response.json["error"]["field"] == "model"


def test_orphaned_statistics_go_with_the_last_copy_of_their_checkpoint(app, client, alice, model):
    from storage.models import Statistic

    with sessions(app) as session:
        sha = session.get(Model, model).sha256
        stat = Statistic(model_sha256=sha, layer="layer3", sample_spec="seeds:0-64", status="ready",
                         object_key=f"shared/statistics/{sha}/second_moment.safetensors",
                         updated_at=utcnow() - timedelta(days=1))
        session.add(stat)
        session.flush()
        stat_id = stat.id
    assert sweep(app)["statistics"] == 0  # its model still holds the hash
    assert client.delete(f"/v1/models/{model}", headers=alice.headers).status_code == 204
    report = sweep(app)
    assert report["statistics"] == 1
    with sessions(app) as session:
        assert session.get(Statistic, stat_id) is None
        # its object was recorded in this pass and goes in a later one
        assert session.get(DeletedObject, f"shared/statistics/{sha}/second_moment.safetensors") is not None
