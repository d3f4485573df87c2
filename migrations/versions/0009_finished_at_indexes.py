"""Indexes on jobs.finished_at and batches.finished_at, for retention.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24

With ``PALIMPSEST_RETENTION_SECONDS`` set, every reconciler pass looks for jobs and batches
that ended before the cutoff (``storage.deletion.expire``). Rows still queued or running have
no ``finished_at``, so the range on this index holds only rows that are due (and batch members
waiting for their batch).
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0009"
down_revision: Union[str, None] = "0008"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index(op.f("ix_jobs_finished_at"), "jobs", ["finished_at"])
    op.create_index(op.f("ix_batches_finished_at"), "batches", ["finished_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_batches_finished_at"), table_name="batches")
    op.drop_index(op.f("ix_jobs_finished_at"), table_name="jobs")
