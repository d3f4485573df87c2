"""A task sent through the real broker is run by a real worker and writes to the real store."""
import json
import time
import uuid

import pytest

from stack import embedded_stack, wait_until

pytestmark = pytest.mark.integration


def send_probe(stack) -> str:
    key = f"probe/{uuid.uuid4().hex}.json"
    stack.celery().send_task("workers.tasks.probe", args=[key])
    return key


def read_json(store, key):
    with store.open(key) as f:
        return json.load(f)


def test_probe_goes_through_broker_worker_and_store(stack):
    store = stack.store()
    sent = time.monotonic()
    key = send_probe(stack)
    wait_until(lambda: store.exists(key), timeout=30, what=f"{key} in the {stack.name} store")
    round_trip_s = time.monotonic() - sent

    body = read_json(store, key)
    assert body["worker"].startswith(stack.worker.hostname + "@")  # written by *our* worker process
    assert body["pid"] in {p.pid for p in stack.worker.tree()}
    print(f"{stack.name}: worker ready in {stack.worker.ready_s:.2f} s, probe round trip {round_trip_s:.2f} s")


def test_probe_is_routed_to_cpu_queue_and_waits_for_a_cpu_worker(tmp_path):
    """A gpu-only worker leaves the probe alone; it stays queued until a cpu worker starts."""
    stack = embedded_stack(tmp_path)
    stack.migrate()
    store = stack.store()
    try:
        gpu_worker = stack.start_worker(queues="gpu")
        key = send_probe(stack)
        time.sleep(4)  # several broker polls (1 s apart on the SQL transport)
        assert not store.exists(key)
        assert "workers.tasks.probe" not in gpu_worker.log().split("[tasks]")[-1].split("ready.")[-1]

        cpu_worker = stack.start_worker(queues="cpu")
        wait_until(lambda: store.exists(key), timeout=30, what=f"{key} after a cpu worker started")
        assert read_json(store, key)["worker"].startswith(cpu_worker.hostname + "@")
    finally:
        stack.stop_all()


def test_celery_command_starts_the_same_worker(tmp_path):
    """`celery -A workers.main worker` is the same app as `palimpsest worker`: it runs the probe."""
    stack = embedded_stack(tmp_path)
    stack.migrate()
    store = stack.store()
    try:
        import sys

        worker = stack.start_worker(command=[sys.executable, "-m", "celery", "-A", "workers.main", "worker",
                                             "--queues=cpu", "--concurrency=1", "--loglevel=info"])
        key = send_probe(stack)
        wait_until(lambda: store.exists(key), timeout=30, what=f"{key} via the celery command")
        assert read_json(store, key)["worker"].startswith(worker.hostname + "@")
    finally:
        stack.stop_all()
