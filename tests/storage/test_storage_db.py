"""Engines, sessions and the Flask wiring."""
import subprocess
import sys
import textwrap

import pytest
from flask import Flask
from sqlalchemy import func, select, text

from storage import db
from storage.db import make_engine, make_session_factory, normalize_url, session_scope
from storage.models import Tenant


def test_normalize_url_picks_psycopg3():
    assert normalize_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_sqlite_connections_share_the_file_safely(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/new/folder/p.db")  # folder is created
    with engine.connect() as c:
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA busy_timeout")).scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    engine.dispose()


def test_postgres_engine_pings_before_use(postgres_url):
    engine = make_engine(postgres_url)
    assert engine.pool._pre_ping
    with engine.connect() as c:
        assert c.execute(text("SELECT 1")).scalar() == 1
    engine.dispose()


def test_session_scope_commits_or_rolls_back(sqlite_url):
    factory = make_session_factory(make_engine(sqlite_url))
    with session_scope(factory) as s:
        s.add(Tenant(name="kept"))
    with pytest.raises(RuntimeError):
        with session_scope(factory) as s:
            s.add(Tenant(name="dropped"))
            s.flush()
            raise RuntimeError("boom")
    with session_scope(factory) as s:
        assert s.scalars(select(Tenant.name)).all() == ["kept"]


WRITER = textwrap.dedent("""
    import sys
    from storage.db import make_engine, make_session_factory, session_scope
    from storage.models import Tenant
    factory = make_session_factory(make_engine(sys.argv[1]))
    for i in range(int(sys.argv[2])):
        with session_scope(factory) as s:
            s.add(Tenant(name=f"{sys.argv[3]}-{i}"))
""")


def test_two_processes_write_one_sqlite_file(sqlite_url):
    """The API and a worker write the same SQLite file at once: WAL and the busy
    timeout make them wait for each other instead of failing with 'database is locked'."""
    n = 150
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, sqlite_url, str(n), name],
                                stderr=subprocess.PIPE, text=True)
               for name in ("api", "worker")]
    factory = make_session_factory(make_engine(sqlite_url))
    for i in range(n):  # this process reads and writes meanwhile
        with session_scope(factory) as s:
            s.scalar(select(func.count(Tenant.id)))
            s.add(Tenant(name=f"main-{i}"))
    for w in writers:
        assert w.wait(timeout=120) == 0, w.stderr.read()
    with session_scope(factory) as s:
        assert s.scalar(select(func.count(Tenant.id))) == 3 * n


def make_app(url):
    app = Flask(__name__)
    app.config["PALIMPSEST_DATABASE_URL"] = url

    @app.get("/tenants")
    def tenants():
        session = db.get_session()
        assert db.get_session() is session  # one per request
        app.sessions_seen.append(session)
        return {"names": session.scalars(select(Tenant.name)).all()}

    @app.post("/tenants")
    def add_tenant():
        session = db.get_session()
        session.add(Tenant(name="from-view"))
        session.commit()
        return {}, 201

    @app.post("/uncommitted")
    def uncommitted():
        db.get_session().add(Tenant(name="never-committed"))
        return {}, 201

    app.sessions_seen = []
    db.init_app(app)
    return app


def test_flask_session_per_request(sqlite_url):
    app = make_app(sqlite_url)
    state = app.extensions["palimpsest_db"]
    assert isinstance(state, db.Database)
    client = app.test_client()
    assert client.post("/tenants").status_code == 201
    assert client.post("/uncommitted").status_code == 201
    assert client.get("/tenants").json == {"names": ["from-view"]}
    client.get("/tenants")
    first, second = app.sessions_seen
    assert first is not second
    # closed at teardown: no transaction left open, every connection back in the pool
    assert not first.in_transaction() and not second.in_transaction()
    assert state.engine.pool.checkedout() == 0


def test_worker_imports_do_not_load_flask():
    code = ("import sys, storage.db, storage.models, storage.objects, storage.migrate; "
            "print('flask' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
