"""The object store: large files (checkpoints, statistics, deltas, previews).

One small protocol, ``ObjectStore``, with two implementations chosen by the storage URL:
``file:///path`` -> ``LocalStore``, ``s3://bucket/prefix`` -> ``S3Store``.

- ``put`` streams in chunks and hashes while it goes; no object is ever visible half
  written (local: temp file + ``os.replace``; S3: an object appears only when its
  upload completes, and a failed multipart upload is aborted).
- Errors are translated here: callers see ``ObjectNotFound`` (a ``FileNotFoundError``),
  ``StorageUnavailable`` (the backend cannot be reached or keeps failing) or
  ``InvalidKey``, never a botocore type.
- Keys are relative, ``/``-separated, and validated so that none can escape its root or
  prefix. Build them with ``tenant_key`` and ``content_key``.
"""
import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError

CHUNK_SIZE = 1024 * 1024
MAX_KEY_LENGTH = 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


class StorageError(Exception):
    """Base class of the object store's errors."""


class StorageUnavailable(StorageError):
    """The backend cannot be reached, or keeps failing after retries."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """No object at this key."""


class InvalidKey(StorageError, ValueError):
    """A key that could escape its root, or is otherwise malformed."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size: int


class ObjectStore(Protocol):
    def put(self, key: str, stream: BinaryIO, content_type: str | None = None) -> StoredObject: ...

    def open(self, key: str) -> BinaryIO: ...

    def exists(self, key: str) -> bool: ...

    def url(self, key: str, expires_in: int = 3600) -> str | None: ...

    def delete(self, key: str) -> None: ...

    def check(self) -> None: ...


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ``InvalidKey``.

    Refused: empty keys or parts, a leading ``/``, ``.`` and ``..`` parts, parts starting
    with ``.`` (kept for the local store's temp files), backslashes, NUL and control chars.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"object key must be a non-empty string, not {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"object key longer than {MAX_KEY_LENGTH} characters")
    if key.startswith("/"):
        raise InvalidKey(f"object key must be relative, not {key!r}")
    if "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidKey(f"object key has a backslash or control character: {key!r}")
    for part in key.split("/"):
        if not part or part.startswith("."):
            raise InvalidKey(f"object key has an empty, '.' or '..' or hidden part: {key!r}")
    return key


def _component(value: str, what: str) -> str:
    if not isinstance(value, str) or "/" in value:
        raise InvalidKey(f"{what} must be a single key part, not {value!r}")
    return validate_key(value)


def tenant_key(tenant_id: str, *parts: str) -> str:
    """``tenants/<tenant_id>/<parts...>``: a key inside one tenant's space."""
    return validate_key("/".join(["tenants", _component(tenant_id, "tenant_id"), *parts]))


def content_key(tenant_id: str | None, kind: str, sha256: str, name: str) -> str:
    """A content-addressed key: ``tenants/<tenant>/<kind>/<sha256>/<name>``, or
    ``shared/<kind>/<sha256>/<name>`` when ``tenant_id`` is None (e.g. statistics, which
    depend only on the checkpoint's bytes)."""
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise InvalidKey(f"sha256 must be 64 lowercase hex digits, not {sha256!r}")
    parts = [_component(kind, "kind"), sha256, _component(name, "name")]
    if tenant_id is None:
        return validate_key("/".join(["shared", *parts]))
    return tenant_key(tenant_id, *parts)


def copy_hashed(stream: BinaryIO, out: BinaryIO) -> tuple[str, int]:
    """Copy ``stream`` to ``out`` chunk by chunk; return (sha256 hex, size)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK_SIZE):
        digest.update(chunk)
        out.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """Objects as files under ``root``. ``content_type`` is not kept (the database
    rows that point at objects carry it)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def put(self, key: str, stream: BinaryIO, content_type: str | None = None) -> StoredObject:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        except OSError as e:
            raise StorageUnavailable(f"cannot write under {self.root}: {e}") from e
        try:
            with os.fdopen(fd, "wb") as out:
                sha256, size = copy_hashed(stream, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        _fsync_dir(path.parent)  # the rename itself survives a crash
        return StoredObject(key, sha256, size)

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise ObjectNotFound(key) from e
        except OSError as e:
            raise StorageUnavailable(f"cannot read {key}: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def url(self, key: str, expires_in: int = 3600) -> str | None:
        validate_key(key)
        return None  # no URL to hand out: the API streams the file itself

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error (as on S3)."""
        try:
            self._path(key).unlink(missing_ok=True)
        except IsADirectoryError:
            pass
        except OSError as e:
            raise StorageUnavailable(f"cannot delete {key}: {e}") from e

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageUnavailable(f"object store root {self.root} unusable: {e}") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"object store root {self.root} is not writable")


class _HashingReader:
    """A read-only, non-seekable view of a stream that hashes what passes through.

    boto3 reads a non-seekable stream in order, one part at a time, and takes a short
    read for the end of the data, so ``read(n)`` keeps reading until it has ``n`` bytes
    or the stream is exhausted (request bodies and pipes often return less)."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._digest = hashlib.sha256()
        self.size = 0

    def read(self, n: int | None = -1) -> bytes:
        parts = []
        remaining = n if n is not None and n >= 0 else None
        while remaining is None or remaining > 0:
            chunk = self._stream.read(CHUNK_SIZE if remaining is None else remaining)
            if not chunk:
                break
            parts.append(chunk)
            if remaining is not None:
                remaining -= len(chunk)
        data = b"".join(parts)
        self._digest.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class _S3Reader(io.RawIOBase):
    """An S3 object body as a standard raw stream, with botocore errors translated."""

    def __init__(self, body, key: str):
        self._body = body
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._body.read(len(buffer))
        # urllib3's own errors (SSLError, ProtocolError, ...) and socket errors can come
        # through botocore's streaming body untranslated
        except (BotoCoreError, HTTPError, OSError) as e:
            raise StorageUnavailable(f"reading {self._key} failed: {e}") from e
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


_BOTO_ERRORS = (BotoCoreError, ClientError, S3UploadFailedError)
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_UNAVAILABLE_CODES = {
    "NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
    "InternalError",
}


class S3Store:
    """Objects in ``bucket`` under ``prefix``, through one boto3 client.

    Retries live in botocore (standard mode: connection errors, 5xx and throttling are
    retried with backoff); whatever still fails becomes ``StorageUnavailable``.
    Credentials come from the usual AWS sources (environment, profile, instance role).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        *,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        region_name: str | None = None,
    ):
        self.bucket = bucket
        self.prefix = validate_key(prefix.strip("/")) if prefix.strip("/") else ""
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            signature_version="s3v4",
            # custom endpoints (MinIO, moto, Ceph) rarely do virtual-hosted buckets
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            config=config,
            region_name=region_name or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )
        # 8 MiB parts, one in memory at a time: a put's memory stays bounded (about
        # 30 MiB measured, with the copies made while a part is built) whatever the
        # object's size. Parts go up one after another; two in memory measured ~42 MiB
        # for no gain against a local server.
        self.transfer_config = TransferConfig(
            multipart_threshold=8 * 1024 * 1024,
            multipart_chunksize=8 * 1024 * 1024,
            max_concurrency=1,
        )
        self.transfer_config.max_in_memory_upload_chunks = 1

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, e: Exception, key: str | None) -> StorageError:
        where = f"s3://{self.bucket}/{self._key(key) if key else self.prefix}"
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _NOT_FOUND_CODES and key is not None:
                return ObjectNotFound(key)
            if code in _UNAVAILABLE_CODES or status >= 500 or status in (401, 403):
                return StorageUnavailable(f"{where}: {code or status}: {e}")
            return StorageError(f"{where}: {code or status}: {e}")
        return StorageUnavailable(f"{where}: {e}")  # BotoCoreError, S3UploadFailedError

    def put(self, key: str, stream: BinaryIO, content_type: str | None = None) -> StoredObject:
        full_key = self._key(key)
        reader = _HashingReader(stream)
        extra = {"ContentType": content_type} if content_type else None
        try:
            self.client.upload_fileobj(
                reader, self.bucket, full_key, ExtraArgs=extra, Config=self.transfer_config
            )
        except _BOTO_ERRORS as e:
            raise self._translate(e, key) from e
        return StoredObject(key, reader.hexdigest(), reader.size)

    def open(self, key: str) -> BinaryIO:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except _BOTO_ERRORS as e:
            raise self._translate(e, key) from e
        return io.BufferedReader(_S3Reader(response["Body"], key), buffer_size=CHUNK_SIZE)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except _BOTO_ERRORS as e:
            error = self._translate(e, key)
            if isinstance(error, ObjectNotFound):
                return False
            raise error from e
        return True

    def url(self, key: str, expires_in: int = 3600) -> str | None:
        """A presigned GET URL; it does not check that the object exists."""
        try:
            return self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(key)},
                ExpiresIn=expires_in,
            )
        except _BOTO_ERRORS as e:
            raise self._translate(e, key) from e

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except _BOTO_ERRORS as e:
            raise self._translate(e, key) from e

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except _BOTO_ERRORS as e:
            error = self._translate(e, None)
            if isinstance(error, ObjectNotFound) or type(error) is StorageError:
                error = StorageUnavailable(str(error))
            raise error from e


def open_store(storage_url: str, s3_endpoint_url: str | None = None) -> ObjectStore:
    """The store a settings URL names: ``file:///abs/path`` or ``s3://bucket/prefix``."""
    if storage_url.startswith("file://"):
        path = unquote(storage_url[len("file://"):])
        if not path:
            raise ValueError("PALIMPSEST_STORAGE_URL: file:// URL needs a path")
        return LocalStore(path)
    if storage_url.startswith("s3://"):
        bucket, _, prefix = storage_url[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"PALIMPSEST_STORAGE_URL: no bucket in {storage_url!r}")
        return S3Store(bucket, prefix, endpoint_url=s3_endpoint_url)
    raise ValueError(
        f"PALIMPSEST_STORAGE_URL must start with file:// or s3://, not {storage_url!r}"
    )
