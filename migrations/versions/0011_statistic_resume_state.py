"""resume_object_key and resume_sha256 on statistics and statistic_shards: a computation
stopped part-way.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24

A worker that stops (a deploy), or a job cancelled while it computes a statistic, gives the
statistic (or its shard) back. Until now the next claim counted it from its first seed; now
the worker uploads the moment of the seeds done so far (``rewriting.statistics``) and names
the object here, and the next claim goes on from the seed after them. Both tables hold a row
per statistic or shard, not per job, so the sweep's lookup by key needs no index.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: Union[str, None] = "0010"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TABLES = ("statistics", "statistic_shards")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("resume_object_key", sa.String(length=1024), nullable=True))
            batch.add_column(sa.Column("resume_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("resume_sha256")
            batch.drop_column("resume_object_key")
