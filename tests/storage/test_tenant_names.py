"""Tenant names are unique (migration 0006): existing duplicates are renamed, keeping
their ids, and two ``keys create`` calls racing on one new name share one tenant, on
SQLite and PostgreSQL."""
import secrets
import threading

import pytest
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from api.auth import create_key
from storage import migrate
from storage.models import ApiKey, Tenant


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request):
    return request.getfixturevalue(f"empty_{request.param}_url")


def execute(url, sql, params=None):
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(sql), params or {})
            return result.all() if result.returns_rows else None
    finally:
        engine.dispose()


def test_0006_renames_later_duplicates_and_keeps_their_ids(empty_url):
    migrate.upgrade(empty_url, "0005")
    tenants = [("ten_a", "acme", "2026-01-01 00:00:00"), ("ten_b", "acme", "2026-01-02 00:00:00"),
               ("ten_c", "acme", "2026-01-03 00:00:00"), ("ten_d", "other", "2026-01-01 00:00:00"),
               ("ten_e", "x" * 200, "2026-01-01 00:00:00"), ("ten_f", "x" * 200, "2026-01-02 00:00:00")]
    for tenant_id, name, created in tenants:
        execute(empty_url, "INSERT INTO tenants (id, name, created_at) VALUES (:id, :name, :created)",
                {"id": tenant_id, "name": name, "created": created})
    migrate.upgrade(empty_url, "0006")
    names = dict(execute(empty_url, "SELECT id, name FROM tenants"))
    assert names["ten_a"] == "acme" and names["ten_d"] == "other" and names["ten_e"] == "x" * 200
    assert names["ten_b"] == "acme (ten_b)" and names["ten_c"] == "acme (ten_c)"
    assert names["ten_f"].endswith(" (ten_f)") and len(names["ten_f"]) == 200
    with pytest.raises(Exception, match="(?i)unique"):
        execute(empty_url, "INSERT INTO tenants (id, name, created_at) VALUES ('ten_g', 'acme', '2026-02-01')")
    migrate.downgrade(empty_url, "0005")
    execute(empty_url, "INSERT INTO tenants (id, name, created_at) VALUES ('ten_g', 'acme', '2026-02-01')")


def test_create_key_that_loses_the_race_for_a_new_tenant_joins_it(postgres_url):
    """Another ``keys create`` commits the tenant between our select and our insert: the
    insert hits the unique name and the key goes to the tenant the other call made."""
    engine = create_engine(postgres_url, poolclass=NullPool)
    name = f"race-{secrets.token_hex(4)}"
    try:
        with Session(engine) as session:
            raced = []

            def other_call_commits_first(session, flush_context, instances):
                if raced:
                    return
                raced.append(True)
                with Session(engine) as other:
                    create_key(other, name, "other")
                    other.commit()

            event.listen(session, "before_flush", other_call_commits_first)
            _, row = create_key(session, name, "ours")
            our_tenant = row.tenant_id
            session.commit()
        with Session(engine) as session:
            tenants = session.scalars(select(Tenant).where(Tenant.name == name)).all()
            keys = session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenants[0].id)).all()
        assert len(tenants) == 1 and our_tenant == tenants[0].id
        assert {k.name for k in keys} == {"ours", "other"}
    finally:
        engine.dispose()


def test_concurrent_key_creation_makes_one_tenant(postgres_url):
    engine = create_engine(postgres_url, pool_size=8)
    name = f"burst-{secrets.token_hex(4)}"
    barrier, errors, tenant_ids = threading.Barrier(8), [], []

    def create():
        try:
            with Session(engine) as session:
                barrier.wait()
                _, row = create_key(session, name)
                session.commit()
                tenant_ids.append(row.tenant_id)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        with Session(engine) as session:
            tenants = session.scalars(select(Tenant.id).where(Tenant.name == name)).all()
    finally:
        engine.dispose()
    assert errors == [] and len(tenant_ids) == 8
    assert set(tenant_ids) == set(tenants) and len(tenants) == 1
