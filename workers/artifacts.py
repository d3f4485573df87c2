"""Moving files between a worker's disk and the object store, by content.

- ``put_file`` uploads a local file under a content-addressed key
  (``storage.objects.content_key``: ``tenants/<tenant>/<kind>/<sha256>/<name>``, or
  ``shared/<kind>/<sha256>/<name>`` for tenant None). The same bytes always land at the
  same key, so a retried upload rewrites identical bytes and never clobbers another file.
- ``fetch`` brings an object into the worker's cache (``<data_dir>/cache``), named by its
  sha256, verified, and written atomically; a second fetch of the same content is free.

Torch-free: the API may import it.
"""
import hashlib
import io
import os
import tempfile
import time
from pathlib import Path

from storage.deletion import revive
from storage.objects import CHUNK_SIZE, StoredObject, content_key, copy_hashed
from workers.retry import retry_transaction


class ChecksumMismatch(Exception):
    """An object's bytes do not hash to the sha256 the database recorded for it."""

    code = "checksum_mismatch"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def put_file(session_factory, store, path, tenant_id: str | None, kind: str, name: str,
             content_type: str | None = None, sha256: str | None = None, db_retry_s: float = 0) -> StoredObject:
    """Upload ``path`` to ``content_key(tenant_id, kind, <its sha256>, name)``.

    The file is hashed first (the key needs the hash) unless the caller just wrote it and
    knows its ``sha256``, then streamed; the store's own hash of what it received must
    agree, or the upload is refused. The key's deletion record, if a deleted row left one,
    is dropped first (``storage.deletion.revive``, tried again for ``db_retry_s`` while the
    database is away), so the sweep leaves the object alone."""
    sha256 = sha256 or file_sha256(path)
    key = content_key(tenant_id, kind, sha256, name)
    _revive(session_factory, key, db_retry_s)
    with open(path, "rb") as f:
        stored = store.put(key, f, content_type=content_type)
    if stored.sha256 != sha256:
        raise ChecksumMismatch(f"{path} changed while it was uploaded to {key}")
    return stored


def put_bytes(session_factory, store, data: bytes, tenant_id: str | None, kind: str, name: str,
              content_type: str | None = None, db_retry_s: float = 0) -> StoredObject:
    """As ``put_file``, for a small object held in memory (a delta, a PNG, a JSON document)."""
    key = content_key(tenant_id, kind, hashlib.sha256(data).hexdigest(), name)
    _revive(session_factory, key, db_retry_s)
    return store.put(key, io.BytesIO(data), content_type=content_type)


def _revive(session_factory, key: str, db_retry_s: float) -> None:
    retry_transaction(session_factory, lambda session: revive(session, key), budget_s=db_retry_s,
                      what=f"{key}: revive")


def cache_dir(data_dir) -> Path:
    path = Path(data_dir) / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prune_cache(cache: Path, max_bytes: int, stale_partial_s: float) -> list[Path]:
    """Delete the least recently used files (by modification time, which ``fetch`` refreshes
    on a hit) until ``cache`` holds at most ``max_bytes``; 0 keeps everything. A download
    in progress (``.partial-*``) is left alone, but one not written for ``stale_partial_s``
    (the hard time limit: no task lives longer) was left by a killed process and is
    deleted whatever ``max_bytes`` says. Returns what was deleted."""
    files, deleted = [], []
    with os.scandir(cache) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # pruned by another process meanwhile
                continue
            if not entry.name.startswith(".partial-"):
                files.append((stat.st_mtime, stat.st_size, Path(entry.path)))
            elif stat.st_mtime < time.time() - stale_partial_s:
                Path(entry.path).unlink(missing_ok=True)
                deleted.append(Path(entry.path))
    if max_bytes <= 0:
        return deleted
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
        deleted.append(path)
    return deleted


def fetch(store, key: str, cache: Path, sha256: str | None = None, suffix: str = ".safetensors") -> Path:
    """A local copy of the object at ``key``, in ``cache``.

    With ``sha256`` (what the database recorded) the copy is named by it and verified:
    a copy already there is reused, and bytes that hash otherwise raise ``ChecksumMismatch``.
    Without it the copy is named by a hash of the key (content-addressed keys name their content).
    """
    name = sha256 or hashlib.sha256(key.encode()).hexdigest()
    path = Path(cache) / f"{name}{suffix}"
    try:
        os.utime(path)  # a hit: the most recently used, last to be pruned
        return path
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out, store.open(key) as stream:
            got, _ = copy_hashed(stream, out)
        if sha256 is not None and got != sha256:
            raise ChecksumMismatch(f"{key}: the stored bytes hash to {got[:12]}, the database says {sha256[:12]}")
        os.replace(tmp, path)  # readers see a whole file or none
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
