"""The three issue-5 tasks as a worker registers them: names, queues, and a direct call
of each task object reaching the database and store through its Celery app (queue
behaviour itself is proven in tests/integration, with real workers)."""
import pytest

from job_fixtures import copy_request, fast_params, save_generator
from palimpsest.config import load_settings
from storage import lifecycle
from storage.db import session_scope
from storage.models import Job, Model, Statistic, Tenant
from storage.statistics import insert_statistic, sample_spec
from workers.artifacts import put_file
from workers.celery_app import TASK_MODULES, TASK_ROUTES, make_celery

TASKS = {"workers.jobs.run_job": "gpu", "workers.statistics.compute_statistic": "gpu",
         "workers.models.inspect_model": "cpu"}


@pytest.fixture
def celery(sqlite_url, tmp_path):
    settings = load_settings({"PALIMPSEST_DATA_DIR": str(tmp_path / "var"), "PALIMPSEST_DATABASE_URL": sqlite_url,
                              "PALIMPSEST_STORAGE_URL": f"file://{tmp_path}/objects", "PALIMPSEST_DEVICE": "cpu"})
    celery = make_celery(settings)
    celery.loader.import_default_modules()  # what a worker does at start: import TASK_MODULES
    celery.finalize()
    return celery


def test_tasks_are_registered_and_routed(celery):
    assert set(TASKS) <= set(celery.tasks)
    assert {name: TASK_ROUTES[name]["queue"] for name in TASKS} == TASKS
    assert {name.rpartition(".")[0] for name in TASKS} <= set(TASK_MODULES)


def test_task_objects_run_their_bodies(celery, tmp_path):
    with session_scope(celery.session_factory) as session:
        tenant = Tenant(name="acme")
        session.add(tenant)
        session.flush()
        tenant_id = tenant.id

    # inspect_model: an upload, as the API stores it, becomes ready
    path = save_generator(tmp_path / "g.safetensors")
    stored = put_file(celery.session_factory, celery.store, path, tenant_id, "models", "model.safetensors")
    with session_scope(celery.session_factory) as session:
        model = Model(tenant_id=tenant_id, name="g", architecture="demo-gan", config={}, sha256=stored.sha256,
                      size=stored.size, object_key=stored.key)
        session.add(model)
        session.flush()
        model_id = model.id
    celery.tasks["workers.models.inspect_model"](model_id)

    # compute_statistic: the statistic a job will need
    with session_scope(celery.session_factory) as session:
        assert session.get(Model, model_id).status == "ready"
        stat_id = insert_statistic(session, stored.sha256, "layer3.conv", sample_spec(64)).id
    celery.tasks["workers.statistics.compute_statistic"](stat_id)

    # run_job: uses it
    with session_scope(celery.session_factory) as session:
        assert session.get(Statistic, stat_id).status == "ready"
        job_id = lifecycle.create_job(session, tenant_id=tenant_id, model_id=model_id, layer="layer3",
                                      request=copy_request(), params=fast_params()).id
    celery.tasks["workers.jobs.run_job"](job_id)
    with session_scope(celery.session_factory) as session:
        job = session.get(Job, job_id)
        assert job.status == "succeeded" and job.metrics["statistic"]["id"] == stat_id
        assert session.get(Statistic, stat_id).fencing_token == 1
