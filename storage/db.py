"""Engine, sessions, and the Flask wiring for the metadata database.

Workers import this module too, so Flask is imported only inside ``init_app`` and
``get_session``: a worker never loads it.

SQLite (the embedded default) is shared by the API and a worker process, so every
connection turns on foreign keys, WAL (readers do not block the writer) and a busy
timeout (a writer waits for the other's short transaction instead of failing).
The driver begins a transaction at the first write, not at a SELECT, so state changes
must be compare-and-set ``UPDATE ... WHERE`` statements, which is also what makes them
safe on PostgreSQL under READ COMMITTED. Keep transactions short: never hold a session
open across model loading or optimisation.
"""
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


class Database(NamedTuple):
    """What ``init_app`` keeps in ``app.extensions["palimpsest_db"]``."""

    engine: Engine
    session_factory: sessionmaker


def normalize_url(url: str) -> str:
    """Pick the installed PostgreSQL driver (psycopg 3) for plain ``postgresql://`` URLs."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def make_engine(url: str, **kwargs) -> Engine:
    """An engine for ``url``: SQLite gets per-connection pragmas, PostgreSQL pool_pre_ping."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **kwargs)

    database = parsed.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, connection_record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker:
    # expire_on_commit=False: objects stay readable after session_scope commits, e.g.
    # a view returns the job it just inserted.
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(session_factory: sessionmaker) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception, always close."""
    session = session_factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def init_app(app) -> None:
    """Attach the database to a Flask app: engine and session factory in
    ``app.extensions["palimpsest_db"]`` (a ``Database``), one session per request."""
    engine = make_engine(app.config["PALIMPSEST_DATABASE_URL"])
    app.extensions["palimpsest_db"] = Database(engine, make_session_factory(engine))
    app.teardown_appcontext(close_session)


def get_session() -> Session:
    """The current request's session, made on first use and closed at teardown.

    The view commits what it wants kept; anything uncommitted is rolled back at close.
    """
    from flask import current_app, g

    if "palimpsest_session" not in g:
        g.palimpsest_session = current_app.extensions["palimpsest_db"].session_factory()
    return g.palimpsest_session


def close_session(exc: BaseException | None = None) -> None:
    from flask import g

    session = g.pop("palimpsest_session", None)
    if session is not None:
        session.close()
