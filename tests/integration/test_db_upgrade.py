"""`palimpsest db upgrade` migrates the configured database to the newest schema."""
import subprocess

import pytest
from sqlalchemy import create_engine, inspect

from storage import migrate
from storage.db import normalize_url
from storage.models import Base
from stack import Stack

pytestmark = pytest.mark.integration


def tables(url: str) -> set[str]:
    engine = create_engine(normalize_url(url))
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite-default", "postgres"])
def test_db_upgrade_creates_the_schema(backend, tmp_path, request):
    data_dir = tmp_path / "var"  # does not exist yet: the command creates it
    variables = {"PALIMPSEST_DATA_DIR": str(data_dir)}
    if backend == "postgres":
        variables["PALIMPSEST_DATABASE_URL"] = request.getfixturevalue("empty_postgres_url")
    stack = Stack(backend, data_dir, variables)
    url = stack.settings.database_url
    if backend == "postgres":
        assert not set(Base.metadata.tables) & tables(url)
    else:
        assert not data_dir.exists()

    done = subprocess.run(stack.palimpsest("db", "upgrade"), env=stack.env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert set(Base.metadata.tables) <= tables(url)
    assert migrate.current(url) == migrate.head()
