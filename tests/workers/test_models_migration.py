"""Migration 0002 (models.status, models.error): existing models become ready, the round
trip keeps their rows, and the schema matches storage.models, on SQLite and PostgreSQL."""
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from storage import migrate
from storage.models import Base


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request):
    return request.getfixturevalue(f"empty_{request.param}_url")


def engine_for(url):
    return create_engine(url, poolclass=NullPool)


def model_columns(url):
    engine = engine_for(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns("models")}
    finally:
        engine.dispose()


def insert_model(url, model_id, **extra):
    columns = dict(id=model_id, name="old", architecture="demo-gan", config="{}", sha256="a" * 64, size=1,
                   object_key="shared/models/x/model.safetensors", layers="[]", created_at="2026-01-01 00:00:00",
                   **extra)
    engine = engine_for(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"INSERT INTO models ({', '.join(columns)}) "
                                    f"VALUES ({', '.join(':' + k for k in columns)})"), columns)
    finally:
        engine.dispose()


def select_models(url):
    engine = engine_for(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(
                "SELECT id, name, status, error FROM models ORDER BY id"))]
    finally:
        engine.dispose()


def test_0002_round_trip_keeps_models_and_makes_old_ones_ready(empty_url):
    migrate.upgrade(empty_url, "0001")
    insert_model(empty_url, "mdl_old")
    migrate.upgrade(empty_url, "0002")
    assert migrate.current(empty_url) == "0002"
    assert {"status", "error"} <= model_columns(empty_url)
    assert select_models(empty_url) == [("mdl_old", "old", "ready", None)]

    insert_model(empty_url, "mdl_new", status="pending")
    with pytest.raises(IntegrityError):  # the check constraint refuses other statuses
        insert_model(empty_url, "mdl_bad", status="exploded")

    migrate.downgrade(empty_url, "0001")
    assert not {"status", "error"} & model_columns(empty_url)
    engine = engine_for(empty_url)
    try:
        with engine.connect() as connection:
            assert sorted(connection.execute(text("SELECT id FROM models")).scalars()) == ["mdl_new", "mdl_old"]
    finally:
        engine.dispose()
    migrate.upgrade(empty_url)
    assert select_models(empty_url) == [("mdl_new", "old", "ready", None), ("mdl_old", "old", "ready", None)]


def test_head_does_not_drift_from_the_models(empty_url):
    migrate.upgrade(empty_url)
    assert migrate.current(empty_url) == migrate.head()
    engine = engine_for(empty_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True,
                                                                   "compare_server_default": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
