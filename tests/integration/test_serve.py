"""`palimpsest serve --with-worker` on the embedded defaults: ready, runs tasks, and
stops as one unit (no orphans either way round)."""
import signal
import time
import uuid

import psutil
import pytest
import requests

from stack import embedded_stack, wait_until

pytestmark = pytest.mark.integration


def alive(pids) -> list[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def is_worker(proc: psutil.Process) -> bool:
    return "worker" in proc.cmdline()[3:5]  # python -m palimpsest worker ...


@pytest.fixture
def served(tmp_path):
    stack = embedded_stack(tmp_path)
    assert not stack.data_dir.exists()
    try:
        server = stack.start_server(with_worker=True)
        wait_until(lambda: any(is_worker(p) for p in server.tree()), timeout=30, what="worker process")
        yield stack, server
    finally:
        stack.stop_all()


def test_serve_with_worker_is_ready_on_embedded_defaults(served):
    stack, server = served
    assert stack.data_dir.is_dir()  # created on start
    assert f"API on {server.url} (routes under /v1" in server.log()  # prints where it listens

    response = wait_until(lambda: (r := requests.get(f"{server.url}/v1/readyz", timeout=5)).status_code == 200 and r,
                          timeout=30, what="readyz 200")
    assert response.json()["checks"] == {"database": {"status": "ok"}, "broker": {"status": "ok"},
                                         "store": {"status": "ok"}}

    # The worker inside serve consumes the embedded broker.
    key = f"probe/{uuid.uuid4().hex}.json"
    stack.celery().send_task("workers.tasks.probe", args=[key])
    store = stack.store()
    wait_until(lambda: store.exists(key), timeout=30, what="probe run by serve's worker")
    print(f"serve --with-worker: healthz after {server.ready_s:.2f} s")


def test_sigterm_stops_server_and_worker_without_orphans(served):
    _, server = served
    tree = [p.pid for p in server.tree()]
    assert len(tree) >= 4  # supervisor, gunicorn arbiter + worker, celery worker (+ its pool)

    stopping = time.monotonic()
    server.signal(signal.SIGTERM)  # the supervisor only, as `docker stop` or systemd would
    assert server.popen.wait(timeout=60) == 0
    wait_until(lambda: not alive(tree), timeout=30, what=f"no survivors of {tree}")
    print(f"serve --with-worker stopped in {time.monotonic() - stopping:.2f} s")


def test_worker_death_stops_the_server(served):
    _, server = served
    tree = server.tree()
    worker = next(p for p in psutil.Process(server.pid).children() if is_worker(p))  # not its pool child
    worker.kill()  # a crash, not a polite stop

    status = server.popen.wait(timeout=60)
    assert status == 128 + signal.SIGKILL  # the supervisor reports how its worker died
    wait_until(lambda: not alive(p.pid for p in tree), timeout=30, what="no survivors")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/v1/healthz", timeout=2)
