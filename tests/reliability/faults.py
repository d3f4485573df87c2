"""Servers the fault tests own and break: a Redis, a PostgreSQL cluster, a TCP proxy in
front of the S3 server; and ``Service``, a running Palimpsest (API server, workers, beat)
on a ``tests/stack.py`` stack, with the reads the tests check (rows, events, artifacts).

Every server here is the test's own (its own port, its own directory), never the
machine's: the tests stop, restart, flush and cut them off.
"""
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from glob import glob
from pathlib import Path

import pytest
from sqlalchemy import select

from palimpsest.client import Client
from stack import Process, Stack, free_port, services_stack, wait_until

ROOT = Path(__file__).resolve().parents[2]
DEMO_REQUEST = ROOT / "demo" / "requests" / "dome_to_spire.json"

# Short leases and a frequent reconciler, so that a recovery takes seconds, not minutes.
# The Redis visibility timeout stays at its default (2 h): recovery must not wait for it.
FAULT_ENV = {
    "PALIMPSEST_JOB_LEASE_SECONDS": "6",
    "PALIMPSEST_RECONCILE_INTERVAL_SECONDS": "2",
    "PALIMPSEST_RECONCILE_GRACE_SECONDS": "3",
    "PALIMPSEST_JOB_MAX_ATTEMPTS": "5",  # a loaded CI machine may stall a heartbeat once
    "OMP_NUM_THREADS": "1",  # two worker processes on two cores
}
# Jobs that take about a second once their statistic is ready.
QUICK = {"samples": 64, "steps": 5, "held_out": 1}


def now() -> datetime:
    return datetime.now(timezone.utc)


# --- Redis ----------------------------------------------------------------------------------

class RedisServer:
    """``redis-server`` on its own port and directory, append-only (fsync every second)."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.process = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(self.ping, 20, what=f"redis-server on {self.port}")

    def ping(self) -> bool:
        import redis

        try:
            return redis.Redis(port=self.port, socket_connect_timeout=1).ping()
        except redis.RedisError:
            return False

    def stop(self):
        """SIGTERM: Redis writes its append-only file and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def client(self):
        import redis

        return redis.Redis(port=self.port)


# --- PostgreSQL -----------------------------------------------------------------------------

def pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class PostgresCluster:
    """A PostgreSQL cluster of the test's own: ``initdb`` in a temporary directory, its own
    port, started and stopped with ``pg_ctl``. As root, the tools run as ``postgres``
    (initdb refuses root)."""

    def __init__(self, port: int | None = None):
        self.initdb, self.pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            pytest.skip("initdb / pg_ctl not found (PATH, /usr/lib/postgresql/*/bin)")
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="palimpsest-pg-"))
        self.data = self.root / "data"
        self.as_user = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args):
        done = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}"

    def init(self):
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self):
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "postgres.log"),
                  "-w", "-t", "60", "start")

    def stop(self):
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def remove(self):
        try:
            self.stop()
        except AssertionError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def own_database():
    """A fresh database on the machine's PostgreSQL (``PALIMPSEST_TEST_POSTGRES``), dropped
    afterwards: the reconciler looks at every job of its database, so no other test's."""
    import psycopg

    server = os.environ.get("PALIMPSEST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
    name = f"palimpsest_faults_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL unreachable at {server}: {error}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{server.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fault_stack(tmp_path_factory, name: str, database_url: str | None = None, s3_endpoint: str | None = None,
                **variables):
    """A services stack of the test's own: its own Redis (``stack.redis``), a fresh
    database (or ``database_url``), and the file store, or a fresh bucket behind
    ``s3_endpoint``. ``variables``: more PALIMPSEST_* settings."""
    root = tmp_path_factory.mktemp(name)
    redis = RedisServer(root / "redis")
    redis.start()
    try:
        with (nullcontext(database_url) if database_url else own_database()) as url:
            storage_url = f"file://{root}/objects"
            if s3_endpoint is not None:
                import boto3

                bucket = f"palimpsest-{name}-{secrets.token_hex(4)}".lower().replace("_", "-")
                boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
                storage_url = f"s3://{bucket}/objects"
            stack = services_stack(root, url, redis.url, storage_url, s3_endpoint)
            if s3_endpoint is None:
                del stack.variables["PALIMPSEST_S3_ENDPOINT_URL"]
            stack.variables.update(variables)
            stack.redis = redis
            yield stack
    finally:
        redis.stop()


# --- a breakable connection to the S3 server -----------------------------------------------

class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; the server behind keeps its data whatever
    the proxy does. ``down()`` resets every open connection and then, until ``up()``:
    ``refuse`` (the default) closes the listening socket, so clients get "connection
    refused"; ``reset`` accepts each connection and resets it at once (a server failing)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.failing = False
        self._listener = None
        self._connections = set()
        self._lock = threading.Lock()

    def up(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self, mode: str = "refuse"):
        if mode == "refuse":
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.close()
        else:
            self.failing = True
        with self._lock:
            for conn in list(self._connections):
                _reset(conn)
            self._connections.clear()

    def restore(self):
        """End the outage ``down`` started."""
        if self.failing:
            self.failing = False
        else:
            self.up()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            if self.failing:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _reset(conn: socket.socket):
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # linger 0: the peer sees a reset
    except OSError:
        pass


# --- a running service ----------------------------------------------------------------------

def cli(stack: Stack, *args: str) -> str:
    done = subprocess.run(stack.palimpsest(*args), env=stack.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def demo_body(model_id: str, **params) -> dict:
    request = json.loads(DEMO_REQUEST.read_text())
    return {"model": model_id, "layer": request.pop("layer"), "request": request, "params": {**QUICK, **params}}


@dataclass
class Service:
    """Palimpsest on ``stack``: migrated, the demo registered, an API server, a tenant's client."""

    stack: Stack
    server: Process | None = None
    client: Client | None = None
    model_id: str | None = None
    workers: list = field(default_factory=list)
    beat: Process | None = None
    _engine: object = None

    @classmethod
    def open(cls, stack: Stack, *, workers: int = 0, beat: bool = False) -> "Service":
        stack.variables.update({k: v for k, v in FAULT_ENV.items() if k not in stack.variables})
        stack.migrate()
        service = cls(stack)
        service.model_id = stack.register_demo()
        service.server = stack.start_server()
        service.client = Client(service.server.url, stack.create_key("acme"), timeout=10)
        service.start_workers(workers)
        if beat:
            service.start_beat()
        return service

    def start_workers(self, count: int = 1) -> list[Process]:
        started = [self.stack.start_worker() for _ in range(count)]
        self.workers += started
        return started

    def start_beat(self) -> Process:
        self.beat = self.stack.start(self.stack.palimpsest("beat", "--loglevel=info"), "beat")
        self.beat.wait_for_log(r"beat: Starting")
        return self.beat

    def close(self):
        self.stack.stop_all()
        if self._engine is not None:
            self._engine.dispose()

    # -- jobs

    def submit(self, **params) -> str:
        return self.client.submit(demo_body(self.model_id, **params))["id"]

    def session(self):
        from storage.db import make_engine, make_session_factory, session_scope

        if self._engine is None:
            self._engine = make_engine(self.stack.settings.database_url)
        return session_scope(make_session_factory(self._engine))

    def job(self, job_id: str):
        from storage.models import Job

        with self.session() as session:
            return session.get(Job, job_id)

    def jobs(self, job_ids) -> dict:
        from storage.models import Job

        with self.session() as session:
            return {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(list(job_ids))))}

    def events(self, job_id: str) -> list:
        from storage.models import JobEvent

        with self.session() as session:
            return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))

    def transitions(self, job_id: str) -> list:
        return [e for e in self.events(job_id) if e.kind == "transition"]

    def artifacts(self, job_id: str) -> list:
        from storage.models import Artifact

        with self.session() as session:
            return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)))

    def wait_phase(self, job_id: str, phase: str, timeout: float = 300) -> object:
        def reached():
            job = self.job(job_id)
            assert job.status in ("queued", "running"), (job.status, job.error_code, job.error_message)
            return job if job.status == "running" and job.phase == phase else None

        return wait_until(reached, timeout, interval=0.1, what=f"{job_id} {phase}")

    def wait_ended(self, job_ids, timeout: float = 300) -> dict:
        ids = list(job_ids)

        def ended():
            jobs = self.jobs(ids)
            return jobs if all(j.status in ("succeeded", "failed", "cancelled") for j in jobs.values()) else None

        return wait_until(ended, timeout, interval=0.25, what=f"{len(ids)} jobs ended")

    def worker_of(self, job) -> Process:
        """The worker process whose process tree holds the job's lease (``host:pid``)."""
        pid = int(job.lease_owner.rsplit(":", 1)[1])
        for worker in self.workers:
            if pid in {p.pid for p in worker.tree()}:
                return worker
        raise LookupError(f"no worker of ours runs pid {pid}")

    def kill(self, worker: Process) -> datetime:
        """SIGKILL the worker's whole process group (parent and pool children at once)."""
        at = now()
        os.killpg(worker.pid, signal.SIGKILL)
        worker.popen.wait(timeout=10)
        self.workers.remove(worker)
        return at


@contextmanager
def warm_service(stack: Stack, *, workers: int, beat: bool = False):
    """``Service.open`` on ``stack`` after one demo job has run to ``succeeded``: the workers'
    caches are warm and the statistic every later job loads is computed. Closed on exit."""
    service = Service.open(stack, workers=workers, beat=beat)
    try:
        first = service.submit()
        assert service.wait_ended([first], timeout=300)[first].status == "succeeded"
        yield service
    finally:
        service.close()


def assert_one_artifact_set(service: Service, job_id: str):
    """Four artifacts, one per name, each an object in the store with the recorded sha256."""
    import hashlib

    artifacts = service.artifacts(job_id)
    assert sorted(a.name for a in artifacts) == ["checkpoint", "delta", "metrics", "preview"]
    store = service.stack.store()
    for artifact in artifacts:
        with store.open(artifact.object_key) as f:
            assert hashlib.sha256(f.read()).hexdigest() == artifact.sha256


def seconds(a: datetime, b: datetime) -> float:
    return round((b - a).total_seconds(), 2)

