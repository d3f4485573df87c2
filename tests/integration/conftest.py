"""The ``stack`` fixture: a migrated database and a real ``palimpsest worker`` subprocess,
on the embedded defaults and on the production services (PostgreSQL, Redis, S3 server)."""
import pytest

from stack import embedded_stack, services_stack

pytestmark = pytest.mark.integration


@pytest.fixture(params=["embedded", "services"])
def stack(request, tmp_path):
    if request.param == "embedded":
        s = embedded_stack(tmp_path)
    else:
        s = services_stack(
            tmp_path,
            database_url=request.getfixturevalue("empty_postgres_url"),  # its own, like its bucket
            broker_url=request.getfixturevalue("redis_url"),
            storage_url=request.getfixturevalue("s3_storage_url"),
            s3_endpoint_url=request.getfixturevalue("s3_server"),
        )
    s.migrate()
    try:
        s.worker = s.start_worker()
        yield s
    finally:
        s.stop_all()
