"""The broker is down when the API has committed a row and sends its task: the row must
not be left pending with nothing queued (a model upload, a statistic), so that the retry
the 503 invites does the work. Real API app on the embedded defaults; the broker is a
Redis URL where nothing listens."""
import io
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))

from api import create_app  # noqa: E402
from api.auth import create_key  # noqa: E402
from stack import embedded_stack, free_port  # noqa: E402
from storage.db import session_scope  # noqa: E402
from storage.models import Model, Statistic  # noqa: E402
from v1_helpers import add_model, safetensors_bytes  # noqa: E402


@pytest.fixture
def apps(tmp_path):
    """(API with the broker down, API with the broker up, an API key), on one database."""
    config = {**embedded_stack(tmp_path).settings.as_flask_config(), "TESTING": True}
    from storage import migrate

    migrate.upgrade(config["PALIMPSEST_DATABASE_URL"])
    down = create_app({**config, "PALIMPSEST_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    down.extensions["celery"].conf.broker_connection_max_retries = 0
    down.extensions["celery"].conf.task_publish_retry = False
    up = create_app(config)
    with session_scope(up.extensions["palimpsest_db"].session_factory) as session:
        key, _ = create_key(session, "acme")
    return down, up, {"Authorization": f"Bearer {key}"}


def rows(app, entity):
    with session_scope(app.extensions["palimpsest_db"].session_factory) as session:
        return list(session.scalars(select(entity)))


def test_an_upload_that_cannot_be_queued_fails_the_model(apps):
    down, up, headers = apps
    data = safetensors_bytes(metadata={"architecture": "demo-gan"})
    response = down.test_client().post("/v1/models", data={"file": (io.BytesIO(data), "m.safetensors")},
                                       headers=headers, content_type="multipart/form-data")
    assert response.status_code == 503
    [model] = rows(up, Model)
    assert model.status == "failed" and model.error.startswith("queue_unavailable: ")
    shown = up.test_client().get(f"/v1/models/{model.id}", headers=headers).json
    assert shown["status"] == "failed"


def test_a_statistic_that_cannot_be_queued_is_queued_by_the_retry(apps):
    down, up, headers = apps
    model = add_model(up, None)
    body = {"model": model, "layer": "layer3", "samples": 64}
    assert down.test_client().post("/v1/statistics", json=body, headers=headers).status_code == 503
    [stat] = rows(up, Statistic)
    assert stat.status == "failed" and stat.error.startswith("queue_unavailable: ")
    # the retry the 503 invites queues it (202), rather than answer 200 "under way"
    retried = up.test_client().post("/v1/statistics", json=body, headers=headers)
    assert retried.status_code == 202 and retried.json["id"] == stat.id
