"""Object store contract: the same tests against LocalStore and S3Store (on a real moto
server), plus key validation and error translation."""
import hashlib
import io
import os
import socket
import time

import psutil
import pytest
import requests

from storage.objects import (
    InvalidKey,
    LocalStore,
    ObjectNotFound,
    S3Store,
    StorageError,
    StorageUnavailable,
    StoredObject,
    content_key,
    open_store,
    tenant_key,
)

MiB = 1024 * 1024
SHA = "ab" * 32


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(f"file://{tmp_path}/objects")
    s3_server = request.getfixturevalue("s3_server")
    return open_store(request.getfixturevalue("s3_storage_url"), s3_endpoint_url=s3_server)


class GeneratedStream:
    """``size`` bytes of deterministic data, produced on demand (never held whole).
    Records the peak RSS seen while being read, and can fail after ``fail_after`` bytes."""

    def __init__(self, size: int, fail_after: int | None = None):
        self.size = size
        self.fail_after = fail_after
        self.position = 0
        self.block = hashlib.sha256(b"palimpsest").digest() * (MiB // 32)
        self.process = psutil.Process()
        self.peak_rss = self.process.memory_info().rss

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.position >= self.fail_after:
            raise RuntimeError("stream broke midway")
        if n is None or n < 0:
            n = self.size - self.position
        # short reads, like a request body or a pipe: at most 1 MiB, and stop at the
        # failure point so the next read raises
        n = min(n, self.size - self.position, MiB)
        if self.fail_after is not None:
            n = min(n, self.fail_after - self.position)
        start = self.position % MiB
        out = (self.block[start:] + self.block)[:n]
        self.position += len(out)
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
        return out

    def expected_sha256(self) -> str:
        digest = hashlib.sha256()
        done = 0
        while done < self.size:
            n = min(MiB, self.size - done)
            digest.update(self.block[:n])
            done += n
        return digest.hexdigest()


def test_put_open_exists_delete(store):
    data = b"palimpsest " * 1000
    stored = store.put("tenants/t1/models/a.safetensors", io.BytesIO(data), "application/octet-stream")
    assert stored == StoredObject("tenants/t1/models/a.safetensors",
                                  hashlib.sha256(data).hexdigest(), len(data))
    assert store.exists("tenants/t1/models/a.safetensors")
    with store.open("tenants/t1/models/a.safetensors") as f:
        assert f.read(5) == b"palim"
        assert f.read() == data[5:]
    store.delete("tenants/t1/models/a.safetensors")
    assert not store.exists("tenants/t1/models/a.safetensors")
    store.delete("tenants/t1/models/a.safetensors")  # deleting twice is not an error


def test_put_replaces_whole_object(store):
    store.put("k/obj", io.BytesIO(b"first version, longer"))
    stored = store.put("k/obj", io.BytesIO(b"second"))
    assert stored.size == 6
    with store.open("k/obj") as f:
        assert f.read() == b"second"


def test_empty_object(store):
    stored = store.put("k/empty", io.BytesIO(b""))
    assert stored.size == 0 and stored.sha256 == hashlib.sha256(b"").hexdigest()
    with store.open("k/empty") as f:
        assert f.read() == b""


def test_missing_object(store):
    assert not store.exists("k/missing")
    with pytest.raises(ObjectNotFound) as excinfo:
        store.open("k/missing")
    assert isinstance(excinfo.value, FileNotFoundError)


def test_url(store):
    store.put("k/obj", io.BytesIO(b"through a presigned URL"))
    url = store.url("k/obj", expires_in=60)
    if isinstance(store, LocalStore):
        assert url is None  # callers stream through the API instead
    else:
        response = requests.get(url, timeout=10)
        assert response.status_code == 200
        assert response.content == b"through a presigned URL"


def test_check(store):
    store.check()


@pytest.mark.parametrize(
    "key",
    ["", "/abs/key", "../escape", "a/../../b", "a/./b", "a//b", "a/", "a\\b", "a\x00b",
     "a\nb", ".hidden", "a/.partial-x", "x" * 1025, None],
)
def test_keys_that_could_escape_are_refused(store, key):
    for call in (lambda: store.put(key, io.BytesIO(b"x")), lambda: store.open(key),
                 lambda: store.exists(key), lambda: store.delete(key),
                 lambda: store.url(key)):
        with pytest.raises(InvalidKey):
            call()


def test_local_store_writes_only_under_root(tmp_path):
    store = LocalStore(tmp_path / "root")
    with pytest.raises(InvalidKey):
        store.put("../outside", io.BytesIO(b"x"))
    assert not (tmp_path / "outside").exists()


def test_failing_stream_leaves_nothing(store, tmp_path):
    store.put("k/kept", io.BytesIO(b"old contents"))
    # small (single PUT) and large (multipart) uploads
    for size, fail_after in ((100, 10), (40 * MiB, 20 * MiB)):
        with pytest.raises(RuntimeError, match="stream broke midway"):
            store.put("k/broken", GeneratedStream(size, fail_after=fail_after))
        assert not store.exists("k/broken")
        with pytest.raises(RuntimeError):
            store.put("k/kept", GeneratedStream(size, fail_after=fail_after))
        with store.open("k/kept") as f:
            assert f.read() == b"old contents"
    if isinstance(store, LocalStore):
        leftovers = [p.name for p in (tmp_path / "objects" / "k").iterdir()]
        assert leftovers == ["kept"]  # no temp files left behind
    else:
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket)
        assert uploads.get("Uploads", []) == []  # the failed multipart upload was aborted


def assert_streams_in_bounded_memory(store, size):
    stream = GeneratedStream(size)
    before = psutil.Process().memory_info().rss
    stored = store.put("big/object", stream)
    assert stored.size == size
    assert stored.sha256 == stream.expected_sha256()
    put_growth = stream.peak_rss - before

    process = psutil.Process()
    peak = before = process.memory_info().rss
    digest = hashlib.sha256()
    total = 0
    with store.open("big/object") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
            total += len(chunk)
            peak = max(peak, process.memory_info().rss)
    assert total == size and digest.hexdigest() == stored.sha256
    read_growth = peak - before
    print(f"{type(store).__name__}: RSS growth put {put_growth / MiB:.1f} MiB, "
          f"read {read_growth / MiB:.1f} MiB for a {size // MiB} MiB object")
    # S3 keeps one 8 MiB part in memory (plus copies while it is built);
    # the local store holds one 1 MiB chunk.
    assert put_growth < (40 * MiB if isinstance(store, S3Store) else 16 * MiB)
    assert read_growth < 16 * MiB


def test_streaming_64_mib_keeps_memory_small(store):
    assert_streams_in_bounded_memory(store, 64 * MiB)


@pytest.mark.slow
def test_streaming_512_mib_keeps_the_same_bound(store):
    """Memory does not grow with the object: the same bound holds at 8x the size."""
    assert_streams_in_bounded_memory(store, 512 * MiB)


def test_s3_objects_live_under_prefix_with_content_type(s3_server, s3_storage_url):
    store = open_store(s3_storage_url, s3_endpoint_url=s3_server)
    assert isinstance(store, S3Store) and store.prefix == "objects"
    store.put("tenants/t1/x.png", io.BytesIO(b"png"), content_type="image/png")
    head = store.client.head_object(Bucket=store.bucket, Key="objects/tenants/t1/x.png")
    assert head["ContentType"] == "image/png"
    listed = store.client.list_objects_v2(Bucket=store.bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["objects/tenants/t1/x.png"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the with block ends: nothing listens


def test_unreachable_s3_raises_storage_unavailable(aws_test_credentials):
    store = S3Store("bucket", "prefix", endpoint_url=f"http://127.0.0.1:{closed_port()}",
                    max_attempts=2, connect_timeout=1, read_timeout=2)
    started = time.monotonic()
    for call in (store.check, lambda: store.exists("k"), lambda: store.open("k"),
                 lambda: store.put("k", io.BytesIO(b"data")), lambda: store.delete("k")):
        with pytest.raises(StorageUnavailable):
            call()
    assert time.monotonic() - started < 30


def test_stopped_s3_server_raises_storage_unavailable(aws_test_credentials):
    """A moto server that was up, then stopped (not just a port never opened)."""
    import subprocess
    import sys

    port = closed_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        store = S3Store("bucket", "", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2,
                        connect_timeout=1, read_timeout=2)
        deadline = time.monotonic() + 30
        while True:
            try:
                store.client.create_bucket(Bucket="bucket")
                break
            except Exception:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        store.put("k", io.BytesIO(b"data"))
        store.check()
    finally:
        process.terminate()
        process.wait(timeout=10)
    with pytest.raises(StorageUnavailable):
        store.open("k")
    with pytest.raises(StorageUnavailable):
        store.check()


def test_missing_bucket_is_unavailable(s3_server):
    store = S3Store("no-such-bucket", "", endpoint_url=s3_server, max_attempts=1)
    with pytest.raises(StorageUnavailable):
        store.check()
    with pytest.raises(StorageUnavailable):
        store.put("k", io.BytesIO(b"x"))


def test_local_store_unusable_root(tmp_path):
    root = tmp_path / "a-file"
    root.write_bytes(b"not a folder")
    store = LocalStore(root)
    with pytest.raises(StorageUnavailable):
        store.check()
    with pytest.raises(StorageUnavailable):
        store.put("k", io.BytesIO(b"x"))


def test_tenant_and_content_keys():
    assert tenant_key("ten_1", "models", "a.safetensors") == "tenants/ten_1/models/a.safetensors"
    assert content_key("ten_1", "artifacts", SHA, "delta.safetensors") == (
        f"tenants/ten_1/artifacts/{SHA}/delta.safetensors")
    assert content_key(None, "statistics", SHA, "layer4.safetensors") == (
        f"shared/statistics/{SHA}/layer4.safetensors")


@pytest.mark.parametrize(
    "build",
    [
        lambda: tenant_key("../ten_2", "x"),
        lambda: tenant_key("ten_1/../ten_2", "x"),
        lambda: tenant_key("ten_1", "..", "ten_2", "x"),
        lambda: tenant_key("", "x"),
        lambda: content_key("ten_1", "artifacts", "not-a-sha", "x"),
        lambda: content_key("ten_1", "artifacts", SHA.upper(), "x"),
        lambda: content_key("ten_1", "a/b", SHA, "x"),
        lambda: content_key("ten_1", "artifacts", SHA, "../x"),
    ],
)
def test_key_builders_refuse_escapes(build):
    with pytest.raises(InvalidKey):
        build()


@pytest.mark.parametrize(
    "url, kind, where",
    [
        ("file:///var/lib/palimpsest/objects", LocalStore, "/var/lib/palimpsest/objects"),
        ("s3://bucket/some/prefix", S3Store, ("bucket", "some/prefix")),
        ("s3://bucket", S3Store, ("bucket", "")),
    ],
)
def test_open_store_parses_urls(url, kind, where, aws_test_credentials):
    store = open_store(url)
    assert isinstance(store, kind)
    if kind is LocalStore:
        assert str(store.root) == where
    else:
        assert (store.bucket, store.prefix) == where


@pytest.mark.parametrize("url", ["http://x", "/plain/path", "s3://", "file://"])
def test_open_store_refuses_bad_urls(url):
    with pytest.raises(ValueError):
        open_store(url)


@pytest.mark.parametrize(
    "code, status, expected",
    [
        ("NoSuchKey", 404, ObjectNotFound),
        ("404", 404, ObjectNotFound),
        ("SlowDown", 503, StorageUnavailable),
        ("InternalError", 500, StorageUnavailable),
        ("ServiceUnavailable", 503, StorageUnavailable),
        ("NoSuchBucket", 404, StorageUnavailable),
        ("AccessDenied", 403, StorageUnavailable),
        ("InvalidArgument", 400, StorageError),
    ],
)
def test_s3_error_translation(code, status, expected, aws_test_credentials):
    """What botocore raises after its retries, as callers see it."""
    from botocore.exceptions import ClientError

    store = S3Store("bucket", "prefix", endpoint_url="http://127.0.0.1:9")
    error = ClientError({"Error": {"Code": code, "Message": "m"},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    translated = store._translate(error, "k")
    assert type(translated) is expected


def test_an_s3_read_cut_by_tls_is_storage_unavailable():
    """urllib3's own errors (here an SSL EOF mid-body) come through botocore's streaming body
    untranslated: the reader turns them into StorageUnavailable, which workers retry."""
    import ssl

    from botocore.response import StreamingBody
    from urllib3.response import HTTPResponse

    from storage.objects import CHUNK_SIZE, StorageUnavailable, _S3Reader

    class CutOff(io.RawIOBase):
        def __init__(self):
            self.reads = 0

        def readable(self):
            return True

        def readinto(self, buffer):
            self.reads += 1
            if self.reads > 1:
                raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
            buffer[:4] = b"abcd"
            return 4

    raw = HTTPResponse(body=CutOff(), preload_content=False, headers={"content-length": "100"})
    stream = io.BufferedReader(_S3Reader(StreamingBody(raw, 100), "k"), buffer_size=CHUNK_SIZE)
    with pytest.raises(StorageUnavailable):
        while stream.read(CHUNK_SIZE):
            pass
