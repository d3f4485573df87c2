"""Settings from the environment, with embedded defaults that need no server.

One place reads ``PALIMPSEST_*``; the API, the workers and the command line all
build from the same ``Settings`` so that they agree on database, broker and store.
"""
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Settings:
    data_dir: str
    database_url: str
    broker_url: str
    storage_url: str
    s3_endpoint_url: str | None
    device: str
    # Celery: a task past the soft limit gets SoftTimeLimitExceeded, past the hard limit its process is killed.
    # Soft 0: none (the prefork pool only starts the hard limit's clock once the soft one has fired).
    task_soft_time_limit: int = 3600
    task_time_limit: int = 3900
    # Redis redelivers an unacknowledged task after this many seconds; with acks_late it must exceed
    # task_time_limit, or a long task still running would be delivered to a second worker.
    broker_visibility_timeout: int = 7200
    # Workers: a job's (and a statistic's) lease lasts this long unless renewed (every third of it).
    job_lease_seconds: int = 30
    # Images (seeds) in a layer statistic when a job does not say (params "samples"); see workers/statistics.py.
    stat_samples: int = 5000
    # Workers: a statistic over more images than this is split into shards of this many (rounded up
    # to whole batches of 64), each its own task, computed by as many workers as are free.
    shard_samples: int = 2048
    # Workers: loaded models and statistics each worker process keeps in memory (LRU; 0: none).
    cache_models: int = 2
    cache_statistics: int = 16
    # Workers: downloaded checkpoints and statistics kept on disk under <data_dir>/cache, in MiB;
    # the least recently used go first once a task ends above it (0: never evicted).
    cache_disk_mb: int = 20_480
    # API: largest checkpoint upload (streamed to the store, never held in memory), in bytes.
    max_upload_bytes: int = 8 * 1024**3
    # API: lifetime of the presigned S3 URLs that artifact downloads redirect to.
    presign_seconds: int = 300
    # Batches (POST /v1/batches): the most edits (JSONL lines) and bytes one batch may hold.
    batch_max_lines: int = 10_000
    batch_max_bytes: int = 64 * 1024**2
    # Webhooks: the hosts they may go to (empty: none), the HMAC-SHA256 key they are signed with
    # (required once a host is allowed), and how many times a delivery is tried, waiting
    # webhook_retry_seconds after the first failure and twice as long after each next one.
    webhook_allowed_hosts: tuple[str, ...] = ()
    webhook_secret: str | None = None
    webhook_max_attempts: int = 8
    webhook_retry_seconds: int = 10
    # Reliability (docs/reliability.md). The reconciler (workers/reconcile.py; beat and `palimpsest
    # reconcile`) runs every reconcile_interval_seconds and re-sends a job the database holds as queued
    # or running with no live lease and no message in the broker; a message delivered this long ago
    # (reconcile_grace_seconds) to a worker that has not claimed the job counts as lost.
    reconcile_interval_seconds: int = 60
    reconcile_grace_seconds: int = 30
    # Deleted jobs, batches and models (DELETE /v1/...): their objects stay in the store this long, then
    # the reconciler deletes them (storage.deletion). Keep it well above a worker's longest wait between
    # an upload and its commit (storage_retry_seconds and db_retry_seconds).
    deletion_grace_seconds: int = 3600
    # Jobs and batches that ended this long ago are deleted by the reconciler, as DELETE would
    # (storage.deletion.expire); 0 keeps them until deleted.
    retention_seconds: int = 0
    # A job whose lease expired this many times (its worker died each time) is failed (worker_lost).
    job_max_attempts: int = 3
    # Workers retry a database write (and an object store upload) with backoff for this long.
    db_retry_seconds: int = 60
    storage_retry_seconds: int = 120
    # Workers: once a worker is told to stop (SIGTERM: a deploy, a pod eviction), a job it runs may go on
    # this long; then it stops between steps, releases its lease and is queued again for another worker
    # (docs/workers.md, Shutdown). Well under an orchestrator's grace period (30 s in Kubernetes).
    worker_shutdown_grace_seconds: int = 10
    # Fault injection for the reliability tests only: workers pause this long at the start of the
    # uploading phase (0, the default, does nothing).
    test_slow_upload_seconds: int = 0

    def as_flask_config(self) -> dict:
        return {f"PALIMPSEST_{k.upper()}": v for k, v in asdict(self).items()}


def _positive_int(env, name: str, default: int) -> int:
    value = env.get(name) or default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a positive whole number, not {value!r}") from None
    if number <= 0:
        raise ValueError(f"{name} must be positive, not {number}")
    return number


def _count(env, name: str, default: int) -> int:
    """A whole number that may be 0 (a cache that keeps nothing)."""
    value = env.get(name) or default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must not be negative, not {number}")
    return number


def load_settings(environ=None, **overrides) -> Settings:
    """Read settings from ``environ`` (default ``os.environ``), then apply overrides."""
    env = os.environ if environ is None else environ
    data_dir = Path(env.get("PALIMPSEST_DATA_DIR", "./var")).resolve()
    settings = Settings(
        data_dir=str(data_dir),
        database_url=env.get("PALIMPSEST_DATABASE_URL") or f"sqlite:///{data_dir}/palimpsest.db",
        # kombu's SQLAlchemy transport: an embedded broker in a SQLite file.
        broker_url=env.get("PALIMPSEST_BROKER_URL") or f"sqla+sqlite:///{data_dir}/broker.db",
        storage_url=env.get("PALIMPSEST_STORAGE_URL") or f"file://{data_dir}/objects",
        s3_endpoint_url=env.get("PALIMPSEST_S3_ENDPOINT_URL") or None,
        device=env.get("PALIMPSEST_DEVICE", "auto"),
        task_soft_time_limit=_count(env, "PALIMPSEST_TASK_SOFT_TIME_LIMIT", 3600),
        task_time_limit=_positive_int(env, "PALIMPSEST_TASK_TIME_LIMIT", 3900),
        broker_visibility_timeout=_positive_int(env, "PALIMPSEST_BROKER_VISIBILITY_TIMEOUT", 7200),
        job_lease_seconds=_positive_int(env, "PALIMPSEST_JOB_LEASE_SECONDS", 30),
        stat_samples=_positive_int(env, "PALIMPSEST_STAT_SAMPLES", 5000),
        shard_samples=_positive_int(env, "PALIMPSEST_SHARD_SAMPLES", 2048),
        cache_models=_count(env, "PALIMPSEST_CACHE_MODELS", 2),
        cache_statistics=_count(env, "PALIMPSEST_CACHE_STATISTICS", 16),
        cache_disk_mb=_count(env, "PALIMPSEST_CACHE_DISK_MB", 20_480),
        max_upload_bytes=_positive_int(env, "PALIMPSEST_MAX_UPLOAD_BYTES", 8 * 1024**3),
        presign_seconds=_positive_int(env, "PALIMPSEST_PRESIGN_SECONDS", 300),
        batch_max_lines=_positive_int(env, "PALIMPSEST_BATCH_MAX_LINES", 10_000),
        batch_max_bytes=_positive_int(env, "PALIMPSEST_BATCH_MAX_BYTES", 64 * 1024**2),
        webhook_allowed_hosts=tuple(host.strip().lower() for host in
                                    env.get("PALIMPSEST_WEBHOOK_ALLOWED_HOSTS", "").split(",") if host.strip()),
        webhook_secret=env.get("PALIMPSEST_WEBHOOK_SECRET") or None,
        webhook_max_attempts=_positive_int(env, "PALIMPSEST_WEBHOOK_MAX_ATTEMPTS", 8),
        webhook_retry_seconds=_positive_int(env, "PALIMPSEST_WEBHOOK_RETRY_SECONDS", 10),
        reconcile_interval_seconds=_positive_int(env, "PALIMPSEST_RECONCILE_INTERVAL_SECONDS", 60),
        reconcile_grace_seconds=_positive_int(env, "PALIMPSEST_RECONCILE_GRACE_SECONDS", 30),
        deletion_grace_seconds=_count(env, "PALIMPSEST_DELETION_GRACE_SECONDS", 3600),
        retention_seconds=_count(env, "PALIMPSEST_RETENTION_SECONDS", 0),
        job_max_attempts=_positive_int(env, "PALIMPSEST_JOB_MAX_ATTEMPTS", 3),
        db_retry_seconds=_count(env, "PALIMPSEST_DB_RETRY_SECONDS", 60),
        storage_retry_seconds=_count(env, "PALIMPSEST_STORAGE_RETRY_SECONDS", 120),
        worker_shutdown_grace_seconds=_count(env, "PALIMPSEST_WORKER_SHUTDOWN_GRACE_SECONDS", 10),
        test_slow_upload_seconds=_count(env, "PALIMPSEST_TEST_SLOW_UPLOAD_SECONDS", 0),
    )
    settings = replace(settings, **overrides)
    if settings.device not in DEVICES:
        raise ValueError(f"PALIMPSEST_DEVICE must be one of {DEVICES}, not {settings.device!r}")
    if settings.webhook_allowed_hosts and not settings.webhook_secret:
        raise ValueError("PALIMPSEST_WEBHOOK_SECRET is required when PALIMPSEST_WEBHOOK_ALLOWED_HOSTS is set: "
                         "webhooks are always signed")
    return settings
