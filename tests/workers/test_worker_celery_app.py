import json
import subprocess
import sys
from pathlib import Path

import pytest

from api import create_app
from palimpsest.config import load_settings
from workers.celery_app import QUEUES, make_celery, settings_from_config


@pytest.fixture
def settings(tmp_path):
    return load_settings({"PALIMPSEST_DATA_DIR": str(tmp_path / "var"), "PALIMPSEST_TASK_SOFT_TIME_LIMIT": "100",
                          "PALIMPSEST_TASK_TIME_LIMIT": "120"})


def test_reliability_settings(settings):
    conf = make_celery(settings).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (100, 120)
    assert conf.broker_url == settings.broker_url


def test_queues_are_separate(settings):
    queues = {q.name: q for q in make_celery(settings).conf.task_queues}
    assert set(queues) == set(QUEUES) == {"gpu", "cpu"}
    # Distinct exchanges and routing keys: a message for one queue cannot reach the other.
    assert len({(q.exchange.name, q.routing_key) for q in queues.values()}) == 2


def test_probe_routes_to_cpu(settings):
    celery = make_celery(settings)
    route = celery.amqp.router.route({}, "workers.tasks.probe")
    assert route["queue"].name == "cpu"


def test_visibility_timeout_only_for_redis(tmp_path):
    redis = load_settings({"PALIMPSEST_BROKER_URL": "redis://127.0.0.1:6379/0", "PALIMPSEST_DATA_DIR": str(tmp_path)})
    assert make_celery(redis).conf.broker_transport_options == {
        "visibility_timeout": 7200, "priority_steps": list(range(10)), "queue_order_strategy": "priority"}
    assert redis.broker_visibility_timeout > redis.task_time_limit
    # kombu's SQL transport would hand unknown options to create_engine, which refuses them.
    embedded = load_settings({"PALIMPSEST_DATA_DIR": str(tmp_path)})
    assert make_celery(embedded).conf.broker_transport_options == {}


def test_celery_init_app_builds_from_flask_config(tmp_path, settings):
    app = create_app({**settings.as_flask_config(), "PALIMPSEST_BROKER_URL": "redis://example:6379/3"})
    celery = app.extensions["celery"]
    assert celery.conf.broker_url == "redis://example:6379/3"
    assert settings_from_config(app.config) == celery.settings


def test_make_celery_creates_data_dir(settings):
    make_celery(settings)  # the embedded broker's SQLite file goes there
    assert Path(settings.data_dir).is_dir()


CELERY_COMMAND_APP = """
import json, sys
from workers.main import app
conf = app.conf
print(json.dumps({"flask": "flask" in sys.modules, "torch": "torch" in sys.modules, "broker": conf.broker_url,
                  "queues": sorted(q.name for q in conf.task_queues), "acks_late": conf.task_acks_late,
                  "include": list(conf.include)}))
"""


def test_celery_command_app_needs_no_flask_and_matches_make_celery(tmp_path):
    """`celery -A workers.main` finds an app built by make_celery from the environment,
    without importing Flask or torch."""
    env = {"PALIMPSEST_DATA_DIR": str(tmp_path / "var"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", CELERY_COMMAND_APP], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    expected = make_celery(load_settings(env)).conf
    assert result == {"flask": False, "torch": False, "broker": expected.broker_url, "queues": ["cpu", "gpu"],
                      "acks_late": True, "include": list(expected.include)}


def test_the_disk_cache_is_pruned_least_recently_used_first(tmp_path):
    import os

    from workers.artifacts import prune_cache

    for age, name in enumerate(["new", "middle", "old"]):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1_000_000 - age * 100, 1_000_000 - age * 100))
    (tmp_path / ".partial-download").write_bytes(b"x" * 5000)  # a download in progress: never pruned
    assert prune_cache(tmp_path, 0, 3600) == []  # 0: unbounded
    assert prune_cache(tmp_path, 2500, 3600) == [tmp_path / "old.safetensors"]
    assert prune_cache(tmp_path, 2500, 3600) == []
    assert prune_cache(tmp_path, 1, 3600) == [tmp_path / "middle.safetensors", tmp_path / "new.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == [".partial-download"]


def test_a_download_left_by_a_killed_process_is_pruned(tmp_path):
    """A ``.partial-*`` file not written for longer than any task lives belongs to no
    download: it is deleted, even with an unbounded cache; a fresh one is kept."""
    import os
    import time

    from workers.artifacts import prune_cache

    stale, fresh = tmp_path / ".partial-killed", tmp_path / ".partial-running"
    stale.write_bytes(b"x" * 5000)
    fresh.write_bytes(b"x" * 5000)
    os.utime(stale, (time.time() - 4000, time.time() - 4000))
    assert prune_cache(tmp_path, 0, 3600) == [stale]
    assert [p.name for p in tmp_path.iterdir()] == [".partial-running"]


def test_a_cache_hit_counts_as_a_use_and_every_task_prunes(tmp_path):
    import hashlib
    import io
    import os

    from storage.objects import content_key, open_store
    from workers.artifacts import cache_dir, fetch
    from workers.celery_app import make_celery

    settings = load_settings({"PALIMPSEST_DATA_DIR": str(tmp_path), "PALIMPSEST_CACHE_DISK_MB": "1"})
    store = open_store(settings.storage_url)
    cache = cache_dir(settings.data_dir)
    blobs = [bytes([i]) * 400_000 for i in range(3)]
    stored = [store.put(content_key("t", "models", hashlib.sha256(b).hexdigest(), "m.safetensors"), io.BytesIO(b))
              for b in blobs]
    paths = [fetch(store, s.key, cache, s.sha256) for s in stored]
    os.utime(paths[0], (1, 1))
    os.utime(paths[1], (2, 2))
    fetch(store, stored[0].key, cache, stored[0].sha256)  # a hit: now the newest

    celery = make_celery(settings)

    @celery.task(name="tests.noop")
    def noop():
        return None

    noop.apply()  # eager, through the app's task class: after_return prunes
    assert [p.exists() for p in paths] == [True, False, True]  # 1 MiB holds two: the least recent went
    assert paths[0].read_bytes()[:1] == b"\x00"
