"""Service fixtures shared by every test package: PostgreSQL, Redis, a moto S3 server.

Real servers, never mocks. When PostgreSQL or Redis cannot be reached the tests that
need them are skipped, unless ``PALIMPSEST_REQUIRE_SERVICES=1`` (CI sets it), in which
case they fail, so that nothing is skipped silently.

Databases handed out by ``postgres_url`` and ``sqlite_url`` are already migrated to
head; ``empty_postgres_url`` and ``empty_sqlite_url`` are not (for migration tests).
"""
import os
import secrets
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import requests

# Where the servers are; the environment can point elsewhere (another CI layout).
POSTGRES_SERVER = os.environ.get("PALIMPSEST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
REDIS_SERVER = os.environ.get("PALIMPSEST_TEST_REDIS", "redis://127.0.0.1:6379")
# Dedicated db numbers: only the one a session claims is ever flushed, never the whole server.
# Each pytest session claims one (a file lock), so sessions running at once never share a
# broker database, where one session's workers would take the other's tasks.
REDIS_DBS = [int(n) for n in os.environ.get("PALIMPSEST_TEST_REDIS_DB", "8,9,10,11,12,13,14,15").split(",")]
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def services_required() -> bool:
    return os.environ.get("PALIMPSEST_REQUIRE_SERVICES") == "1"


def service_missing(reason: str):
    """Skip, or fail when CI demands every service."""
    if services_required():
        pytest.fail(f"{reason} (PALIMPSEST_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- PostgreSQL -------------------------------------------------------------------

@contextmanager
def postgres_database():
    """A fresh, uniquely named, empty database; dropped afterwards."""
    import psycopg

    name = f"palimpsest_test_{secrets.token_hex(6)}"
    admin = None
    for maintenance_db in ("postgres", "test"):
        try:
            admin = psycopg.connect(f"{POSTGRES_SERVER}/{maintenance_db}",
                                    autocommit=True, connect_timeout=3)
            break
        except psycopg.OperationalError as e:
            error = e
    if admin is None:
        service_missing(f"PostgreSQL unreachable at {POSTGRES_SERVER}: {error}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{POSTGRES_SERVER.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database at the head migration, shared by the session."""
    with postgres_database() as url:
        from storage import migrate  # here, so engine tests run where alembic is not installed

        migrate.upgrade(url)
        yield url


@pytest.fixture
def empty_postgres_url():
    """A fresh PostgreSQL database with no tables, for one test."""
    with postgres_database() as url:
        yield url


# --- SQLite -----------------------------------------------------------------------

@pytest.fixture
def empty_sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/palimpsest.db"


@pytest.fixture(scope="session")
def migrated_sqlite_file(tmp_path_factory):
    """One SQLite file migrated to head per session; tests get copies (migrating a
    fresh file for each of hundreds of tests costs minutes)."""
    from storage import migrate

    path = tmp_path_factory.mktemp("sqlite-template") / "palimpsest.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(empty_sqlite_url, migrated_sqlite_file):
    """A SQLite file in the test's tmp_path, at the head migration (a copy of the template)."""
    import shutil

    shutil.copyfile(migrated_sqlite_file, empty_sqlite_url.removeprefix("sqlite:///"))
    return empty_sqlite_url


# --- Redis ------------------------------------------------------------------------

@contextmanager
def claimed_redis_db():
    """The first db number of ``REDIS_DBS`` that no other running test session holds."""
    import fcntl
    import tempfile

    for number in REDIS_DBS:
        lock = open(os.path.join(tempfile.gettempdir(), f"palimpsest-test-redis-db-{number}.lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        try:
            yield number
        finally:
            lock.close()  # releases the lock
        return
    pytest.fail(f"every Redis test db {REDIS_DBS} is held by another running test session")


@pytest.fixture(scope="session")
def redis_url():
    """``redis://127.0.0.1:6379/<n>``: a db this session alone uses, FLUSHDB'd at start and end."""
    with claimed_redis_db() as number:
        yield from _redis_url(f"{REDIS_SERVER}/{number}")


def _redis_url(url):
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as e:
        service_missing(f"Redis unreachable at {REDIS_SERVER}: {e}")
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


# --- S3 (moto standalone server) -------------------------------------------------

@pytest.fixture(scope="session")
def aws_test_credentials():
    """Dummy AWS credentials for moto, in this process and in any subprocess it starts."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_TEST_ENV.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        yield AWS_TEST_ENV


@pytest.fixture(scope="session")
def s3_server(aws_test_credentials):
    """Endpoint URL of a moto S3 server running as a subprocess on a free loopback port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except requests.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start on port {port}", pytrace=False)
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server."""
    import boto3

    name = f"palimpsest-test-{secrets.token_hex(6)}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_storage_url(s3_bucket):
    """``s3://<fresh bucket>/objects``; pass ``s3_server`` as the endpoint URL."""
    return f"s3://{s3_bucket}/objects"
