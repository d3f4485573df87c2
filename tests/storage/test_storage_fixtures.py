"""The service fixtures themselves: an unreachable service skips, or fails when
PALIMPSEST_REQUIRE_SERVICES=1; the Redis db is flushed, the PostgreSQL database dropped."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psycopg

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

INNER_TESTS = """
import os, redis

def test_postgres(postgres_url):
    with open("postgres_url.txt", "w") as f:
        f.write(postgres_url)

def test_redis(redis_url):
    redis.Redis.from_url(redis_url).set("left-behind", "1")
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_inner(tmp_path, unreachable=True, **env):
    """Run two tests using the fixtures in a separate pytest, with this conftest."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    environ = dict(os.environ)
    environ.pop("PALIMPSEST_REQUIRE_SERVICES", None)
    if unreachable:
        port = closed_port()
        environ["PALIMPSEST_TEST_POSTGRES"] = f"postgresql://postgres@127.0.0.1:{port}"
        environ["PALIMPSEST_TEST_REDIS"] = f"redis://127.0.0.1:{port}"
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=environ, capture_output=True,
                          text=True, timeout=120)


def test_unreachable_services_are_skipped_with_a_reason(tmp_path):
    result = run_inner(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "2 skipped" in result.stdout
    assert "PostgreSQL unreachable" in result.stdout and "Redis unreachable" in result.stdout


def test_unreachable_services_fail_when_required(tmp_path):
    result = run_inner(tmp_path, PALIMPSEST_REQUIRE_SERVICES="1")
    assert result.returncode == 1, result.stdout
    assert "2 errors" in result.stdout and "PALIMPSEST_REQUIRE_SERVICES=1" in result.stdout


def test_fixtures_clean_up_after_themselves(tmp_path, postgres_url, redis_url):
    """After a session: its PostgreSQL database is dropped, its Redis db flushed.
    (The inner session may claim only other db numbers than this session's.)"""
    import redis

    ours = int(redis_url.rsplit("/", 1)[1])
    others = ",".join(str(n) for n in range(8, 16) if n != ours)
    result = run_inner(tmp_path, unreachable=False, PALIMPSEST_REQUIRE_SERVICES="1",
                       PALIMPSEST_TEST_REDIS_DB=others)
    assert result.returncode == 0, result.stdout
    inner_name = (tmp_path / "postgres_url.txt").read_text().rsplit("/", 1)[1]
    with psycopg.connect(postgres_url.replace("+psycopg", "")) as c:
        names = {row[0] for row in c.execute("SELECT datname FROM pg_database")}
    assert inner_name.startswith("palimpsest_test_") and inner_name not in names
    for number in range(8, 16):
        if number != ours:
            assert redis.Redis.from_url(f"{redis_url.rsplit('/', 1)[0]}/{number}").get("left-behind") is None


def test_postgres_database_is_fresh_and_at_head(postgres_url):
    from storage import migrate

    name = postgres_url.rsplit("/", 1)[1]
    assert name.startswith("palimpsest_test_")
    assert migrate.current(postgres_url) == migrate.head()
    with psycopg.connect(postgres_url.replace("+psycopg", "")) as c:
        assert c.execute("SELECT current_database()").fetchone()[0] == name
