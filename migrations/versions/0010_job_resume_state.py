"""jobs.resume_object_key and jobs.resume_sha256: a handed-back job's optimizer state.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24

A worker that stops (a deploy) hands its running job back to the queue. Until now the next
worker ran the edit from its first optimizer step; now the stopping worker uploads where the
optimizer stood (``rewriting.insert.InsertState``) and names the object here, and the next
claim goes on from that step. The sweep asks whether any row names a key: a partial index
holds only the jobs that name one.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: Union[str, None] = "0009"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("resume_object_key", sa.String(length=1024), nullable=True))
        batch.add_column(sa.Column("resume_sha256", sa.String(length=64), nullable=True))
    op.create_index("ix_jobs_resume_object_key", "jobs", ["resume_object_key"],
                    postgresql_where=sa.text("resume_object_key IS NOT NULL"),
                    sqlite_where=sa.text("resume_object_key IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_jobs_resume_object_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resume_sha256")
        batch.drop_column("resume_object_key")
