import pytest

from storage.db import make_engine, make_session_factory


@pytest.fixture(params=["sqlite", "postgres"])
def session_factory(request):
    """A session factory on a migrated database, once on SQLite and once on PostgreSQL."""
    engine = make_engine(request.getfixturevalue(f"{request.param}_url"))
    yield make_session_factory(engine)
    engine.dispose()
