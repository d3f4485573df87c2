"""Task bodies, called directly (queue behaviour is proven in tests/integration)."""
import json

import pytest

from palimpsest.config import load_settings
from storage.objects import InvalidKey
from workers.celery_app import make_celery


@pytest.fixture
def celery(tmp_path):
    celery = make_celery(load_settings({"PALIMPSEST_DATA_DIR": str(tmp_path / "var")}))
    import workers.tasks  # noqa: F401  (registers the shared tasks)

    celery.finalize()
    return celery


def test_probe_writes_json_object(celery):
    celery.tasks["workers.tasks.probe"]("probe/direct.json")
    with celery.store.open("probe/direct.json") as f:
        body = json.load(f)
    assert set(body) == {"worker", "pid", "written_at"}


def test_probe_twice_is_harmless(celery):
    probe = celery.tasks["workers.tasks.probe"]
    probe("probe/again.json")
    probe("probe/again.json")
    assert celery.store.exists("probe/again.json")


def test_probe_refuses_escaping_key(celery, tmp_path):
    with pytest.raises(InvalidKey):
        celery.tasks["workers.tasks.probe"]("../outside.json")
    assert not (tmp_path / "var" / "outside.json").exists()
