"""Indexes on artifacts.object_key and artifacts.sha256, for the deleted-object sweep.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24

The reconciler's pass (``storage.deletion.sweep``) asks, every pass, whether a statistic's
checkpoint hash is still held by an artifact, and, for each key whose deletion record is due,
whether an artifact still names it. Without these indexes both read the whole artifacts table
(four rows a job): 3.6 s a pass at a million artifacts on PostgreSQL.
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0008"
down_revision: Union[str, None] = "0007"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index(op.f("ix_artifacts_object_key"), "artifacts", ["object_key"])
    op.create_index(op.f("ix_artifacts_sha256"), "artifacts", ["sha256"])


def downgrade() -> None:
    op.drop_index(op.f("ix_artifacts_sha256"), table_name="artifacts")
    op.drop_index(op.f("ix_artifacts_object_key"), table_name="artifacts")
