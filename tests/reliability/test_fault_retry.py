"""``workers.retry.retry_call`` (what is retried, how long, with what backoff) and the API's
answer when its database cannot be reached at all, without any process of our own."""
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from storage.objects import StorageUnavailable
from workers.retry import STORE_ERRORS, retry_call


def failing(times: int, error: Exception):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return fn, calls


KEY = "plm_0123456789ab_" + "x" * 43  # well formed: the API must look it up in the database
DB_DOWN = OperationalError("INSERT ...", {}, Exception("connection refused"))


def test_transient_database_errors_are_retried_with_doubling_delays():
    fn, calls = failing(5, DB_DOWN)
    slept = []
    assert retry_call(fn, budget_s=60, what="test", sleep=slept.append) == "done"
    assert len(calls) == 6
    assert slept == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_the_budget_ends_the_retries_with_the_last_error():
    import time

    fn, calls = failing(1000, DB_DOWN)
    started = time.monotonic()
    with pytest.raises(OperationalError):
        retry_call(fn, budget_s=0.3, what="test", first_delay=0.05, max_delay=0.05)
    assert time.monotonic() - started < 0.5
    assert 3 <= len(calls) <= 7


def test_errors_that_cannot_heal_are_raised_at_once():
    fn, calls = failing(1, IntegrityError("INSERT ...", {}, Exception("duplicate key")))
    with pytest.raises(IntegrityError):
        retry_call(fn, budget_s=60, what="test", sleep=lambda s: None)
    assert len(calls) == 1


def test_store_errors_only_where_asked_and_give_up_stops_early():
    fn, calls = failing(3, StorageUnavailable("s3://b: Could not connect"))
    assert retry_call(fn, budget_s=60, what="upload", errors=STORE_ERRORS, sleep=lambda s: None) == "done"
    fn, calls = failing(3, StorageUnavailable("s3://b: Could not connect"))
    with pytest.raises(StorageUnavailable):  # not a database error: not retried by default
        retry_call(fn, budget_s=60, what="upload", sleep=lambda s: None)
    fn, calls = failing(3, StorageUnavailable("s3://b: Could not connect"))
    with pytest.raises(StorageUnavailable):  # cancelled meanwhile
        retry_call(fn, budget_s=60, what="upload", errors=STORE_ERRORS, give_up=lambda: True, sleep=lambda s: None)
    assert len(calls) == 1


def test_api_answers_503_with_retry_after_when_its_database_refuses_connections(tmp_path):
    from api import create_app
    from stack import free_port

    app = create_app({"TESTING": True, "PALIMPSEST_DATA_DIR": str(tmp_path),
                      "PALIMPSEST_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"})
    client = app.test_client()
    for response in (client.get("/v1/jobs", headers={"Authorization": f"Bearer {KEY}"}),
                     client.post("/v1/jobs", json={}, headers={"Authorization": f"Bearer {KEY}"})):
        assert response.status_code == 503
        assert response.json["error"]["code"] == "service_unavailable"
        assert response.headers["Retry-After"] == "5"
    assert client.get("/v1/healthz").status_code == 200
