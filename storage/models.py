"""The metadata database: one declarative ``Base`` for every table.

Portable between SQLite (the embedded default) and PostgreSQL:
- ids are strings made in Python (``job_3f9c...``), so no sequence is needed and an id
  can be handed out before the row is committed;
- JSON columns use ``sqlalchemy.JSON``;
- timestamps are timezone-aware UTC on the Python side on both databases (``UTCDateTime``).

Schema changes go through ``migrations/`` only; ``tests/storage`` checks that the
migrations and these models do not drift apart.
"""
import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints, so that a later migration can drop or alter them by name
# (SQLite's batch mode cannot touch an unnamed constraint).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
JOB_PHASES = ("loading", "statistics", "optimizing", "evaluating", "uploading")
JOB_EVENT_KINDS = ("transition", "progress")
BATCH_STATUSES = (
    "validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled",
)
BATCH_TERMINAL_STATUSES = ("completed", "failed", "cancelled")
STATISTIC_STATUSES = ("pending", "computing", "ready", "failed")
MODEL_STATUSES = ("pending", "ready", "failed")
WEBHOOK_EVENTS = ("job.completed", "batch.completed")
WEBHOOK_DELIVERY_STATUSES = ("pending", "delivered", "failed", "refused")
BATCH_MERGE_STATUSES = ("succeeded", "failed")
ARTIFACT_NAMES = ("delta", "checkpoint", "preview", "metrics")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    """A random, prefixed id such as ``job_1f0c...``: 96 random bits, readable in logs."""
    return f"{prefix}_{secrets.token_hex(12)}"


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both databases.

    SQLite keeps no offset, so values are stored as naive UTC there and read back as
    aware UTC; PostgreSQL stores ``timestamptz``. Naive input is refused: the caller
    must say which timezone it means.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use an aware UTC datetime")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    """A tenant; ``palimpsest keys create --tenant NAME`` finds it by its unique name."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A tenant's API key. Only a sha256 of the key is kept; ``prefix`` finds the row."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Model(Base):
    """A generator checkpoint. ``tenant_id`` NULL means shared with every tenant (the demo).

    ``status``: an uploaded checkpoint is ``pending`` until ``workers.models.inspect_model``
    has validated it and filled ``layers`` (then ``ready``), or refused it (``failed``,
    with the reason in ``error``)."""

    __tablename__ = "models"
    __table_args__ = (
        Index("ix_models_tenant_id_name", "tenant_id", "name"),
        CheckConstraint(_in("status", MODEL_STATUSES), name="status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    architecture: Mapped[str] = mapped_column(String(100))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(1024))
    # [{"name", "kind", "param", "key_channels", "key_size", "value_channels", "value_size"}, ...]
    # (sizes [h, w] or null), from rewriting.layers.editable_layers
    layers: Mapped[list[Any]] = mapped_column(default=list)
    segmenter_object_key: Mapped[str | None] = mapped_column(String(1024))
    segmenter_architecture: Mapped[str | None] = mapped_column(String(100))
    # rows from before migration 0002 were registered by hand, hence ready
    status: Mapped[str] = mapped_column(String(20), default="pending", server_default=text("'ready'"))
    error: Mapped[str | None] = mapped_column(Text)
    # inspect_model deliveries started, and when the last one started (NULL once it ended):
    # workers.deliveries caps them, so a checkpoint that kills its worker cannot loop forever
    deliveries: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Statistic(Base):
    """Second-moment statistics of one layer of one checkpoint (by content hash).

    Keyed by ``(model_sha256, layer, sample_spec)`` and shared across tenants and jobs:
    the unique constraint makes concurrent jobs converge on one row and one computation.
    """

    __tablename__ = "statistics"
    __table_args__ = (
        UniqueConstraint("model_sha256", "layer", "sample_spec"),
        CheckConstraint(_in("status", STATISTIC_STATUSES), name="status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("sts"))
    model_sha256: Mapped[str] = mapped_column(String(64))
    layer: Mapped[str] = mapped_column(String(200))
    sample_spec: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    count: Mapped[int | None] = mapped_column(BigInteger)
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    object_key: Mapped[str | None] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    fencing_token: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    # NULL: computed in one piece; else split into this many StatisticShard rows (workers.statistics)
    shard_count: Mapped[int | None]
    # a computation stopped part-way (handed back, cancelled): its moment so far, for the next claim
    resume_object_key: Mapped[str | None] = mapped_column(String(1024))
    resume_sha256: Mapped[str | None] = mapped_column(String(64))
    # compute_statistic deliveries (workers.deliveries), as on models
    deliveries: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class StatisticShard(Base):
    """One seed range ``[seed_start, seed_stop)`` of a sharded statistic: its own lease
    (compare-and-set on ``fencing_token``, as the statistic's) and its own partial second
    moment in the store; the statistic is the exact sum of its shards (``workers.statistics``)."""

    __tablename__ = "statistic_shards"
    __table_args__ = (
        UniqueConstraint("statistic_id", "number"),
        CheckConstraint(_in("status", STATISTIC_STATUSES), name="status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("shd"))
    statistic_id: Mapped[str] = mapped_column(ForeignKey("statistics.id", ondelete="CASCADE"))
    number: Mapped[int]  # 0, 1, ... in seed order
    seed_start: Mapped[int]
    seed_stop: Mapped[int]
    status: Mapped[str] = mapped_column(String(20), default="pending")
    count: Mapped[int | None] = mapped_column(BigInteger)
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    object_key: Mapped[str | None] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    resume_object_key: Mapped[str | None] = mapped_column(String(1024))  # as on the statistic
    resume_sha256: Mapped[str | None] = mapped_column(String(64))
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    fencing_token: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_tenant_id_status_created_at", "tenant_id", "status", "created_at"),
        Index("ix_batches_finished_at", "finished_at"),  # retention (storage.deletion.expire)
        CheckConstraint(_in("status", BATCH_STATUSES), name="status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("bat"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(20), default="validating")
    merge: Mapped[bool] = mapped_column(default=False, server_default=false())
    # what its member jobs are queued with: below an interactive job's by default (api/batches.py)
    priority: Mapped[int] = mapped_column(default=2, server_default=text("2"))
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    total_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    succeeded_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    failed_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    cancelled_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    input_object_key: Mapped[str | None] = mapped_column(String(1024))
    output_object_key: Mapped[str | None] = mapped_column(String(1024))
    # a merge handed back part-way: the optimizer state of its first group not merged yet
    resume_object_key: Mapped[str | None] = mapped_column(String(1024))
    resume_sha256: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    # merge_batch deliveries (workers.deliveries), as on models; sweep does not re-send a
    # merge while one is under way
    deliveries: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]


class WebhookDelivery(Base):
    """One webhook notice (``event`` about a job or batch, ``subject_id``) and what its
    sender did: ``attempts``, the last answer, and ``status`` (``refused``: the host was
    not on the allow-list when sending). One row per event and subject, so a completion
    noticed twice is sent once (workers/webhooks.py)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event", "subject_id"),
        CheckConstraint(_in("event", WEBHOOK_EVENTS), name="event"),
        CheckConstraint(_in("status", WEBHOOK_DELIVERY_STATUSES), name="status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whd"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(40))
    subject_id: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(String(2048))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    delivered_at: Mapped[datetime | None]


class Job(Base):
    """One rewrite. State changes are compare-and-set updates guarded by ``fencing_token``:
    every lease grant increments it, and a worker's writes name the token it was granted,
    so a worker whose lease was taken over cannot overwrite the new owner's work."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        UniqueConstraint("batch_id", "custom_id"),
        Index("ix_jobs_tenant_id_status_created_at", "tenant_id", "status", "created_at"),
        Index("ix_jobs_batch_id_status", "batch_id", "status"),
        # the reaper's query: running jobs whose lease has expired
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        Index("ix_jobs_finished_at", "finished_at"),  # retention (storage.deletion.expire)
        # the sweep asks whether a row names a key; only handed-back jobs have one
        Index("ix_jobs_resume_object_key", "resume_object_key", postgresql_where=text("resume_object_key IS NOT NULL"),
              sqlite_where=text("resume_object_key IS NOT NULL")),
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint(f"phase IS NULL OR {_in('phase', JOB_PHASES)}", name="phase"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    custom_id: Mapped[str | None] = mapped_column(String(200))
    layer: Mapped[str] = mapped_column(String(200))
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # a chained edit starts from the weights another job produced
    base_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    priority: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    status: Mapped[str] = mapped_column(String(20), default="queued")
    phase: Mapped[str | None] = mapped_column(String(20))
    progress_step: Mapped[int | None]
    progress_total: Mapped[int | None]
    progress_loss: Mapped[float | None] = mapped_column(Float)
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # where its optimizer stood when a stopping worker handed it back (rewriting.insert.InsertState);
    # the next claim goes on from there; dropped when the job ends (storage.lifecycle)
    resume_object_key: Mapped[str | None] = mapped_column(String(1024))
    resume_sha256: Mapped[str | None] = mapped_column(String(64))

    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    resume_object_key: Mapped[str | None] = mapped_column(String(1024))  # as on the statistic
    resume_sha256: Mapped[str | None] = mapped_column(String(64))
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    fencing_token: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    cancel_requested: Mapped[bool] = mapped_column(default=False, server_default=false())

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobEvent(Base):
    """Append-only history of a job; ``seq`` orders events within the job (for SSE resume)."""

    __tablename__ = "job_events"
    __table_args__ = (
        UniqueConstraint("job_id", "seq"),
        CheckConstraint(_in("kind", JOB_EVENT_KINDS), name="kind"),
    )

    # SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a bigint identity.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int]
    kind: Mapped[str] = mapped_column(String(20))
    status: Mapped[str | None] = mapped_column(String(20))
    phase: Mapped[str | None] = mapped_column(String(20))
    step: Mapped[int | None]
    total: Mapped[int | None]
    loss: Mapped[float | None] = mapped_column(Float)
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    """A file a job produced, in the object store; one per (job, name)."""

    __tablename__ = "artifacts"
    __table_args__ = (
        UniqueConstraint("job_id", "name"),
        CheckConstraint(_in("name", ARTIFACT_NAMES), name="name"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("art"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(20))
    # indexed for storage.deletion's sweep: is a key still named, is a checkpoint still held
    object_key: Mapped[str] = mapped_column(String(1024), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BatchMerge(Base):
    """A batch's succeeded edits on one checkpoint and layer, solved jointly into one
    low-rank update (``workers.merge``): the delta, the edited checkpoint and a report of
    each rule's constraint loss merged and alone."""

    __tablename__ = "batch_merges"
    __table_args__ = (
        UniqueConstraint("batch_id", "model_sha256", "layer"),
        CheckConstraint(_in("status", BATCH_MERGE_STATUSES), name="status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("bmg"))
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"))
    model_sha256: Mapped[str] = mapped_column(String(64))  # the base checkpoint the rules were made on
    layer: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    rules: Mapped[int]  # member edits merged
    rank: Mapped[int | None]  # dimension of the union of their context directions
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    delta_object_key: Mapped[str | None] = mapped_column(String(1024))
    delta_sha256: Mapped[str | None] = mapped_column(String(64))
    checkpoint_object_key: Mapped[str | None] = mapped_column(String(1024))
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    checkpoint_size: Mapped[int | None] = mapped_column(BigInteger)
    report_object_key: Mapped[str | None] = mapped_column(String(1024))
    report_sha256: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeletedObject(Base):
    """An object key whose last known row was deleted (``storage.deletion``). The store keeps
    the object until ``deleted_at`` is older than ``PALIMPSEST_DELETION_GRACE_SECONDS``; then
    the sweep deletes it unless a row names the key again (content-addressed keys are shared:
    a worker may have written the same bytes for another job meanwhile)."""

    __tablename__ = "deleted_objects"

    object_key: Mapped[str] = mapped_column(String(1024), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
