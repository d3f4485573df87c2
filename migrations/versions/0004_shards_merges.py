"""Sharded statistics and merged batch edits.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

``statistics.shard_count`` is NULL for a statistic computed in one piece, else the
number of its ``statistic_shards``: one row per seed range, each with its own lease and
its own partial second moment in the store (``workers.statistics``). ``batch_merges``
holds one joint solve of a batch's edits on one checkpoint and layer (``workers.merge``):
its delta, checkpoint and report objects, and the report itself.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("statistics") as batch:
        batch.add_column(sa.Column("shard_count", sa.Integer(), nullable=True))
    op.create_table(
        "statistic_shards",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("statistic_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("seed_start", sa.Integer(), nullable=False),
        sa.Column("seed_stop", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("object_key", sa.String(length=1024), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("fencing_token", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('pending', 'computing', 'ready', 'failed')",
                           name=op.f("ck_statistic_shards_status")),
        sa.ForeignKeyConstraint(["statistic_id"], ["statistics.id"],
                                name=op.f("fk_statistic_shards_statistic_id_statistics"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_statistic_shards")),
        sa.UniqueConstraint("statistic_id", "number", name=op.f("uq_statistic_shards_statistic_id_number")),
    )
    op.create_table(
        "batch_merges",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=True),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("layer", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("rules", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("report", sa.JSON(), nullable=True),
        sa.Column("delta_object_key", sa.String(length=1024), nullable=True),
        sa.Column("delta_sha256", sa.String(length=64), nullable=True),
        sa.Column("checkpoint_object_key", sa.String(length=1024), nullable=True),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=True),
        sa.Column("checkpoint_size", sa.BigInteger(), nullable=True),
        sa.Column("report_object_key", sa.String(length=1024), nullable=True),
        sa.Column("report_sha256", sa.String(length=64), nullable=True),
        sa.Column("error_code", sa.String(length=100), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('succeeded', 'failed')", name=op.f("ck_batch_merges_status")),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_batch_merges_batch_id_batches"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_batch_merges_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_merges")),
        sa.UniqueConstraint("batch_id", "model_sha256", "layer",
                            name=op.f("uq_batch_merges_batch_id_model_sha256_layer")),
    )


def downgrade() -> None:
    op.drop_table("batch_merges")
    op.drop_table("statistic_shards")
    with op.batch_alter_table("statistics") as batch:
        batch.drop_column("shard_count")
