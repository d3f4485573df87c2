"""Batches and webhooks: a batch's priority, and a record of every webhook delivery.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

``batches.priority`` is the priority its member jobs are queued with (lower than an
interactive job's by default). ``webhook_deliveries`` holds one row per event and
subject (a job or a batch): the unique constraint makes a second notice of the same
completion a no-op, and ``attempts``/``status`` record what the sender did.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), server_default=sa.text("2"), nullable=False))
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("event", sa.String(length=40), nullable=False),
        sa.Column("subject_id", sa.String(length=40), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("event IN ('job.completed', 'batch.completed')", name=op.f("ck_webhook_deliveries_event")),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed', 'refused')",
                           name=op.f("ck_webhook_deliveries_status")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_webhook_deliveries_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("event", "subject_id", name=op.f("uq_webhook_deliveries_event_subject_id")),
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("priority")
