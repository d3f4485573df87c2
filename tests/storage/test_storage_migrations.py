"""Migrations: upgrade/downgrade round trips and no drift from the models, on SQLite
and PostgreSQL."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from storage import migrate
from storage.models import Base

REPO = Path(__file__).resolve().parents[2]
TABLES = set(Base.metadata.tables)  # every table the models declare, each made by a migration


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request):
    return request.getfixturevalue(f"empty_{request.param}_url")


def table_names(url):
    engine = create_engine(url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def drift(url):
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_round_trip(empty_url):
    assert migrate.current(empty_url) is None
    migrate.upgrade(empty_url)
    assert migrate.current(empty_url) == migrate.head()
    assert table_names(empty_url) == TABLES
    migrate.downgrade(empty_url, "base")
    assert migrate.current(empty_url) is None
    assert table_names(empty_url) == set()
    migrate.upgrade(empty_url, "head")
    assert table_names(empty_url) == TABLES
    migrate.upgrade(empty_url)  # at head already: nothing to do
    assert migrate.current(empty_url) == migrate.head()


def test_models_and_migrations_do_not_drift(empty_url):
    migrate.upgrade(empty_url)
    assert drift(empty_url) == []


def test_migrations_name_every_constraint(empty_url):
    """Named constraints are what later SQLite batch migrations need to alter them."""
    migrate.upgrade(empty_url)
    engine = create_engine(empty_url, poolclass=NullPool)
    try:
        inspector = inspect(engine)
        uniques = {u["name"] for t in TABLES for u in inspector.get_unique_constraints(t)}
        foreign = {f["name"] for t in TABLES for f in inspector.get_foreign_keys(t)}
    finally:
        engine.dispose()
    assert {"uq_jobs_tenant_id_idempotency_key", "uq_statistics_model_sha256_layer_sample_spec", "uq_tenants_name",
            "uq_job_events_job_id_seq", "uq_artifacts_job_id_name"} <= uniques
    assert None not in uniques and None not in foreign


def test_plain_alembic_command_reads_palimpsest_database_url(tmp_path):
    """``alembic upgrade head`` from the repository root, URL from the environment."""
    url = f"sqlite:///{tmp_path}/via-cli.db"
    env = {**os.environ, "PALIMPSEST_DATABASE_URL": url}
    alembic = Path(sys.executable).with_name("alembic")
    result = subprocess.run([str(alembic), "upgrade", "head"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert migrate.current(url) == migrate.head()


def test_storage_migrate_works_from_any_directory(tmp_path):
    url = f"sqlite:///{tmp_path}/elsewhere.db"
    code = f"from storage import migrate; migrate.upgrade({url!r}); print(migrate.current({url!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == migrate.head()
