"""The schema's guarantees, on SQLite and PostgreSQL: unique keys that make concurrent
submissions converge, checks, foreign keys, cascades, UTC timestamps, fencing."""
import secrets
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, StatementError

from storage.db import session_scope
from storage.models import (
    Artifact,
    Batch,
    Job,
    JobEvent,
    Model,
    Statistic,
    Tenant,
    new_id,
    utcnow,
)

SHA = "0" * 64


@pytest.fixture
def tenant_and_model(session_factory):
    with session_scope(session_factory) as s:
        tenant = Tenant(name=f"acme-{secrets.token_hex(4)}")
        s.add(tenant)
        s.flush()
        model = Model(tenant_id=None, name="demo", architecture="demo-gan", sha256=SHA,
                      size=123, object_key="shared/models/demo.safetensors",
                      layers=[{"name": "layer4", "key_shape": [256], "value_shape": [256, 8, 8]}])
        s.add(model)
    return tenant.id, model.id


def make_job(tenant_and_model, **fields):
    tenant_id, model_id = tenant_and_model
    return Job(tenant_id=tenant_id, model_id=model_id, layer="layer4",
               request={"copy": [1]}, **fields)


def test_ids_are_prefixed_and_random(session_factory, tenant_and_model):
    with session_scope(session_factory) as s:
        job = make_job(tenant_and_model)
        s.add(job)
    assert job.id.startswith("job_") and len(job.id) == 28
    assert new_id("job") != new_id("job")


def test_defaults_and_json_round_trip(session_factory, tenant_and_model):
    with session_scope(session_factory) as s:
        job = make_job(tenant_and_model, params={"rank": 1, "lr": 0.05, "seeds": [1, 2]})
        s.add(job)
    with session_scope(session_factory) as s:
        loaded = s.get(Job, job.id)
        assert loaded.status == "queued" and loaded.phase is None
        assert (loaded.attempts, loaded.fencing_token, loaded.priority) == (0, 0, 0)
        assert loaded.cancel_requested is False
        assert loaded.params == {"rank": 1, "lr": 0.05, "seeds": [1, 2]}
        model = s.get(Model, tenant_and_model[1])
        assert model.layers[0]["value_shape"] == [256, 8, 8]


def test_idempotency_key_is_unique_per_tenant(session_factory, tenant_and_model):
    with session_scope(session_factory) as s:
        s.add(make_job(tenant_and_model, idempotency_key="abc", request_hash="h1"))
        # no key: any number of jobs
        s.add(make_job(tenant_and_model))
        s.add(make_job(tenant_and_model))
    with pytest.raises(IntegrityError):
        with session_scope(session_factory) as s:
            s.add(make_job(tenant_and_model, idempotency_key="abc", request_hash="h2"))
    # the same key in another tenant is a different request
    with session_scope(session_factory) as s:
        other = Tenant(name=f"other-{secrets.token_hex(4)}")
        s.add(other)
        s.flush()
        s.add(make_job((other.id, tenant_and_model[1]), idempotency_key="abc"))


def test_statistics_key_is_unique(session_factory):
    layer = new_id("layer")  # the PostgreSQL database is shared by the session
    with session_scope(session_factory) as s:
        s.add(Statistic(model_sha256=SHA, layer=layer, sample_spec="demo:n=1000"))
        s.add(Statistic(model_sha256=SHA, layer=layer, sample_spec="demo:n=2000"))
    with pytest.raises(IntegrityError):
        with session_scope(session_factory) as s:
            s.add(Statistic(model_sha256=SHA, layer=layer, sample_spec="demo:n=1000"))
    with session_scope(session_factory) as s:
        rows = s.scalars(select(Statistic).where(Statistic.layer == layer)).all()
        assert sorted(r.sample_spec for r in rows) == ["demo:n=1000", "demo:n=2000"]
        assert {r.status for r in rows} == {"pending"}


def test_event_seq_and_artifact_name_are_unique_per_job(session_factory, tenant_and_model):
    with session_scope(session_factory) as s:
        job = make_job(tenant_and_model)
        s.add(job)
        s.flush()
        s.add(JobEvent(job_id=job.id, seq=1, kind="transition", status="queued"))
        s.add(Artifact(job_id=job.id, name="delta", object_key="k", sha256=SHA, size=1))
    with pytest.raises(IntegrityError):
        with session_scope(session_factory) as s:
            s.add(JobEvent(job_id=job.id, seq=1, kind="progress", step=1, total=10, loss=0.5))
    with pytest.raises(IntegrityError):
        with session_scope(session_factory) as s:
            s.add(Artifact(job_id=job.id, name="delta", object_key="k2", sha256=SHA, size=1))
    with session_scope(session_factory) as s:
        s.add(JobEvent(job_id=job.id, seq=2, kind="progress", step=1, total=10, loss=0.5))
    with session_scope(session_factory) as s:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job.id)
                           .order_by(JobEvent.id)).all()
        assert [e.seq for e in events] == [1, 2]
        assert events[0].id < events[1].id  # autoincrement on both databases


def test_custom_id_is_unique_within_a_batch(session_factory, tenant_and_model):
    with session_scope(session_factory) as s:
        batch = Batch(tenant_id=tenant_and_model[0])
        s.add(batch)
        s.flush()
        s.add(make_job(tenant_and_model, batch_id=batch.id, custom_id="row-1"))
        s.add(make_job(tenant_and_model, custom_id="row-1"))  # outside a batch: no rule
    with pytest.raises(IntegrityError):
        with session_scope(session_factory) as s:
            s.add(make_job(tenant_and_model, batch_id=batch.id, custom_id="row-1"))


@pytest.mark.parametrize(
    "make",
    [
        lambda tm: make_job(tm, status="done"),
        lambda tm: make_job(tm, phase="sleeping"),
        lambda tm: Batch(tenant_id=tm[0], status="paused"),
        lambda tm: Statistic(model_sha256=SHA, layer=new_id("l"), sample_spec="s", status="x"),
        lambda tm: make_job(("ten_missing", tm[1])),  # foreign keys on, also on SQLite
    ],
    ids=["job_status", "job_phase", "batch_status", "statistic_status", "foreign_key"],
)
def test_database_refuses_invalid_rows(session_factory, tenant_and_model, make):
    with pytest.raises(IntegrityError):
        with session_scope(session_factory) as s:
            obj = make(tenant_and_model)
            s.add(obj)


def test_deleting_a_job_deletes_its_events_and_artifacts(session_factory, tenant_and_model):
    with session_scope(session_factory) as s:
        job = make_job(tenant_and_model)
        s.add(job)
        s.flush()
        s.add(JobEvent(job_id=job.id, seq=1, kind="transition", status="queued"))
        s.add(Artifact(job_id=job.id, name="preview", object_key="k", sha256=SHA, size=1))
    with session_scope(session_factory) as s:
        s.execute(Job.__table__.delete().where(Job.id == job.id))
    with session_scope(session_factory) as s:
        assert s.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all() == []
        assert s.scalars(select(Artifact).where(Artifact.job_id == job.id)).all() == []


def test_timestamps_are_aware_utc(session_factory, tenant_and_model):
    paris = timezone(timedelta(hours=2))
    lease_until = datetime(2030, 6, 1, 14, 0, tzinfo=paris)
    with session_scope(session_factory) as s:
        job = make_job(tenant_and_model, lease_expires_at=lease_until)
        s.add(job)
    with session_scope(session_factory) as s:
        loaded = s.get(Job, job.id)
        assert loaded.lease_expires_at == lease_until
        assert loaded.lease_expires_at.tzinfo == timezone.utc
        assert loaded.lease_expires_at.hour == 12
        assert loaded.created_at.tzinfo == timezone.utc
        assert abs(loaded.created_at - utcnow()) < timedelta(minutes=1)
        # comparisons in queries use the same conversion
        expired = s.scalars(select(Job.id).where(
            Job.id == job.id, Job.lease_expires_at < datetime(2030, 6, 1, 12, 30,
                                                              tzinfo=timezone.utc))).all()
        assert expired == [job.id]


def test_naive_datetimes_are_refused(session_factory, tenant_and_model):
    with pytest.raises(StatementError, match="naive datetime"):
        with session_scope(session_factory) as s:
            s.add(make_job(tenant_and_model, heartbeat_at=datetime(2030, 1, 1)))


def test_fencing_token_lets_one_lease_grant_win(session_factory, tenant_and_model):
    """Compare-and-set on fencing_token: of two workers that read token 0, only the first
    to write gets the lease; the second's update matches no row."""
    with session_scope(session_factory) as s:
        job = make_job(tenant_and_model)
        s.add(job)

    def take_lease(owner, seen_token):
        with session_scope(session_factory) as s:
            result = s.execute(
                update(Job)
                .where(Job.id == job.id, Job.fencing_token == seen_token)
                .values(status="running", lease_owner=owner,
                        fencing_token=Job.fencing_token + 1,
                        lease_expires_at=utcnow() + timedelta(minutes=5))
            )
            return result.rowcount == 1

    assert take_lease("worker-a", 0)
    assert not take_lease("worker-b", 0)
    with session_scope(session_factory) as s:
        loaded = s.get(Job, job.id)
        assert (loaded.lease_owner, loaded.fencing_token) == ("worker-a", 1)


def test_keys_layer_names_the_weight_module_holding_the_keys():
    from storage.statistics import keys_layer

    layers = [{"name": "layer6", "param": "layer6.conv.weight"}, {"name": "layer6.conv", "param": "layer6.conv.weight"},
              {"name": "fc", "param": "fc.weight"}, {"name": "layer7", "param": "layer7.conv.weight"}]
    assert keys_layer(layers, "layer6") == keys_layer(layers, "layer6.conv") == "layer6.conv"
    assert keys_layer(layers, "fc") == "fc"
    assert keys_layer(layers, "layer7") == "layer7"  # its weight module is not listed: keep the name
    assert keys_layer(layers, "nope") == "nope"  # unknown names are check_layer's to refuse
