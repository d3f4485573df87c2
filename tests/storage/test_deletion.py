"""The deleted-object sweep on SQLite and PostgreSQL, against a file store and a real S3 server:
a worker reviving a key waits for a sweep that holds its record, and a store that fails
leaves the records for the next sweep."""
import io
import secrets
import threading
from datetime import timedelta

import pytest

from storage import deletion
from storage.db import session_scope
from storage.models import DeletedObject, utcnow
from storage.objects import ObjectNotFound, StorageUnavailable, open_store


def record(session_factory, key: str, age_s: float) -> None:
    with session_scope(session_factory) as session:
        deletion.record_deleted(session, [key], now=utcnow() - timedelta(seconds=age_s))


def recorded(session_factory, key: str) -> bool:
    with session_scope(session_factory) as session:
        return session.get(DeletedObject, key) is not None


def exists(store, key: str) -> bool:
    try:
        store.open(key).close()
        return True
    except ObjectNotFound:
        return False


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/objects")
    return open_store(request.getfixturevalue("s3_storage_url"),
                      s3_endpoint_url=request.getfixturevalue("s3_server"))


def test_only_records_past_the_grace_are_swept(session_factory, store):
    old, new = (f"tenants/t/delta/{secrets.token_hex(8)}/delta.safetensors" for _ in range(2))
    for key in (old, new):
        store.put(key, io.BytesIO(b"x"))
    record(session_factory, old, age_s=120)
    record(session_factory, new, age_s=10)
    deletion.sweep(session_factory, store, grace_seconds=60)
    assert not exists(store, old) and not recorded(session_factory, old)
    assert exists(store, new) and recorded(session_factory, new)


class WatchedStore:
    """The real store; ``during_delete`` runs inside the sweep's transaction, at each delete."""

    def __init__(self, store, during_delete):
        self.store, self.during_delete = store, during_delete

    def delete(self, key):
        self.during_delete(key)
        self.store.delete(key)


def test_a_worker_reviving_a_key_waits_for_the_sweep_then_puts_it_again(session_factory, tmp_path):
    store = open_store(f"file://{tmp_path}/objects")
    key = f"tenants/t/checkpoint/{secrets.token_hex(8)}/model.safetensors"
    store.put(key, io.BytesIO(b"weights"))
    record(session_factory, key, age_s=120)
    revived = threading.Event()

    def worker():  # workers.artifacts.put_file: revive (committed), then put
        with session_scope(session_factory) as session:
            deletion.revive(session, key)
        revived.set()
        store.put(key, io.BytesIO(b"weights"))

    threads = []

    def start_worker(_key):
        threads.append(threading.Thread(target=worker))
        threads[0].start()
        # the sweep holds the record: the revive waits for its commit
        assert not revived.wait(1.0)

    deletion.sweep(session_factory, WatchedStore(store, start_worker), grace_seconds=60)
    threads[0].join(10)
    assert revived.is_set()
    assert exists(store, key)  # put again after the sweep deleted it
    assert not recorded(session_factory, key)


def test_a_store_that_fails_keeps_the_records(session_factory, tmp_path):
    store = open_store(f"file://{tmp_path}/objects")
    key = f"tenants/t/preview/{secrets.token_hex(8)}/preview.png"
    store.put(key, io.BytesIO(b"png"))
    record(session_factory, key, age_s=120)

    def fail(_key):
        raise StorageUnavailable("the store is away")

    with pytest.raises(StorageUnavailable):
        deletion.sweep(session_factory, WatchedStore(store, fail), grace_seconds=60)
    assert recorded(session_factory, key) and exists(store, key)
    deletion.sweep(session_factory, store, grace_seconds=60)
    assert not recorded(session_factory, key) and not exists(store, key)
