"""Alembic environment: migrations target ``storage.models.Base.metadata``.

The URL comes from the Alembic config (``storage.migrate`` sets it) or else from
``PALIMPSEST_DATABASE_URL`` through ``palimpsest.config.load_settings()``.
"""
from logging.config import fileConfig
from pathlib import Path

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from palimpsest.config import load_settings
from storage.db import normalize_url
from storage.models import Base

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    return normalize_url(config.get_main_option("sqlalchemy.url") or load_settings().database_url)


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = database_url()
    # A plain engine, not storage.db.make_engine: SQLite foreign keys stay off while
    # batch mode copies and drops tables (with them on, dropping a parent table would
    # cascade). The busy timeout lets a migration wait for a running API or worker.
    connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    sqlite_file = make_url(url).database if url.startswith("sqlite") else None
    if sqlite_file and sqlite_file != ":memory:":
        Path(sqlite_file).parent.mkdir(parents=True, exist_ok=True)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
