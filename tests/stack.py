"""Start and stop real Palimpsest processes for integration tests.

A ``Stack`` is one configuration (database, broker, object store, data directory)
as ``PALIMPSEST_*`` variables, with helpers that start ``palimpsest worker`` and
``palimpsest serve`` subprocesses on it. Each subprocess runs in its own process
group (its own session) and is stopped with that whole group, so a test never leaves
a worker or a gunicorn behind, even when it fails half way.

    stack = embedded_stack(tmp_path)         # SQLite + SQL broker + file store
    stack.migrate()
    worker = stack.start_worker()            # returns once the worker says "ready"
    stack.celery().send_task("workers.tasks.probe", args=["probe/x.json"])
    wait_until(lambda: stack.store().exists("probe/x.json"))
    worker.stop()
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from palimpsest.config import Settings, load_settings

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; return that, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class Process:
    """A subprocess in its own process group, its output in ``log_path``."""

    popen: subprocess.Popen
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)
    ready_s: float | None = None  # seconds from start to ready (worker: "ready." logged; server: healthz 200)
    hostname: str | None = None  # worker node name
    url: str | None = None  # server base URL
    terminated: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT_S) -> float:
        """Wait until ``pattern`` (a regex) appears in the output; return seconds since start."""
        regex = re.compile(pattern)

        def seen():
            if regex.search(self.log()):
                return True
            if not self.alive():
                raise RuntimeError(f"{self.popen.args} exited ({self.popen.returncode}) before /{pattern}/:\n{self.log()[-4000:]}")
            return False

        try:
            wait_until(seen, timeout, what=f"/{pattern}/ in {self.log_path.name}")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; output so far:\n{self.log()[-4000:]}") from None
        return time.monotonic() - self.started_at

    def tree(self) -> list[psutil.Process]:
        """This process and all its descendants, as they are now."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def terminate(self) -> None:
        """SIGTERM the whole process group, once (a second SIGTERM could cut a warm shutdown short)."""
        if not self.terminated:
            self.terminated = True
            _signal_group(self.pid, signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the whole process group; SIGKILL it if anything is left after ``timeout``.
        Returns the leader's exit status."""
        self.terminate()
        if not wait_group_gone(self.pid, timeout):
            _signal_group(self.pid, signal.SIGKILL)
            wait_group_gone(self.pid, 10.0)
        self.popen.wait(timeout=10)
        return self.popen.returncode


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def wait_group_gone(pgid: int, timeout: float) -> bool:
    try:
        wait_until(lambda: not group_members(pgid), timeout, what=f"process group {pgid} gone")
        return True
    except TimeoutError:
        return False


def start_process(args: list[str], env: dict, log_path: Path) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stop() kills it whole
        )
    return Process(popen, log_path)


@dataclass
class Stack:
    """One deployment configuration, for subprocesses (``env``) and this process (``settings``)."""

    name: str
    data_dir: Path
    variables: dict  # the PALIMPSEST_* variables that define it
    processes: list = field(default_factory=list)

    @property
    def env(self) -> dict:
        """The environment for a subprocess: ours without any outer PALIMPSEST_*, plus the stack's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PALIMPSEST_")}
        return {**env, **self.variables}

    @property
    def settings(self) -> Settings:
        return load_settings(self.variables)

    def celery(self):
        from workers.celery_app import make_celery

        return make_celery(self.settings)

    def store(self):
        from storage.objects import open_store

        return open_store(self.settings.storage_url, self.settings.s3_endpoint_url)

    def register_demo(self) -> str:
        """``palimpsest models register-demo``, in this process (torch is loaded here already:
        the command's own start costs about 4 s): the demo model's id."""
        from storage.db import make_engine, make_session_factory
        from workers.models import register_demo

        engine = make_engine(self.settings.database_url)
        try:
            return register_demo(make_session_factory(engine), self.store())
        finally:
            engine.dispose()

    def create_key(self, tenant: str) -> str:
        """``palimpsest keys create --tenant TENANT``, in this process: a new key."""
        from api.auth import create_key
        from storage.db import make_engine, make_session_factory, session_scope

        engine = make_engine(self.settings.database_url)
        try:
            with session_scope(make_session_factory(engine)) as session:
                return create_key(session, tenant)[0]
        finally:
            engine.dispose()

    def migrate(self) -> None:
        from storage.migrate import upgrade

        upgrade(self.settings.database_url)

    def palimpsest(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "palimpsest", *args]

    def start(self, args: list[str], log_name: str) -> Process:
        process = start_process(args, self.env, self.data_dir / "logs" / f"{log_name}.log")
        self.processes.append(process)
        return process

    def start_worker(self, queues: str = "gpu,cpu", concurrency: int = 1, command: list[str] | None = None) -> Process:
        """A ``palimpsest worker`` (or ``command``), returned once it logs that it is ready."""
        name = f"w{uuid.uuid4().hex[:8]}"
        args = command or self.palimpsest("worker", f"--queues={queues}", f"--concurrency={concurrency}")
        process = self.start([*args, f"--hostname={name}@%h"], f"worker-{name}")
        process.hostname = name
        process.ready_s = process.wait_for_log(rf"{name}@\S+ ready\.")
        return process

    def start_server(self, *, with_worker: bool = False, port: int | None = None) -> Process:
        """``palimpsest serve`` on a free port, returned once /v1/healthz answers."""
        port = port or free_port()
        args = self.palimpsest("serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1")
        if with_worker:
            args.append("--with-worker")
        process = self.start(args, f"serve-{port}")
        process.url = f"http://127.0.0.1:{port}"

        def healthy():
            if not process.alive():
                raise RuntimeError(f"serve exited ({process.popen.returncode}):\n{process.log()[-4000:]}")
            try:
                return requests.get(f"{process.url}/v1/healthz", timeout=2).status_code == 200
            except requests.RequestException:  # not up yet, or too busy to answer in time
                return False

        wait_until(healthy, START_TIMEOUT_S, what=f"{process.url}/v1/healthz")
        process.ready_s = time.monotonic() - process.started_at
        return process

    def stop_all(self) -> None:
        for process in self.processes:  # all at once: each worker takes seconds to shut down warm
            process.terminate()
        while self.processes:
            self.processes.pop().stop()


def embedded_stack(tmp_path: Path) -> Stack:
    """The embedded defaults (SQLite file, kombu's SQL broker on SQLite, file store), all under ``tmp_path``."""
    data_dir = tmp_path / "var"
    return Stack("embedded", data_dir, {"PALIMPSEST_DATA_DIR": str(data_dir), "PALIMPSEST_DEVICE": "cpu"})


def services_stack(tmp_path: Path, database_url: str, broker_url: str, storage_url: str, s3_endpoint_url: str) -> Stack:
    """Production-shaped: PostgreSQL, Redis, an S3 server."""
    data_dir = tmp_path / "var"
    return Stack("services", data_dir, {
        "PALIMPSEST_DATA_DIR": str(data_dir),
        "PALIMPSEST_DATABASE_URL": database_url,
        "PALIMPSEST_BROKER_URL": broker_url,
        "PALIMPSEST_STORAGE_URL": storage_url,
        "PALIMPSEST_S3_ENDPOINT_URL": s3_endpoint_url,
        "PALIMPSEST_DEVICE": "cpu",
    })
