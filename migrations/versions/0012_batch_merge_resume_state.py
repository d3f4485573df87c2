"""batches.resume_object_key and batches.resume_sha256: a merge handed back part-way.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-24

``merge_batch`` ran to its end through a worker's warm shutdown; an orchestrator's kill
left the batch ``finalizing`` until the sweep sent it again, and the merge started over.
Now a stopping worker hands the merge back: it saves the optimizer state of the group it
was solving, names it here and sends the task again; the next delivery goes on from that
step. One row per batch: no index for the sweep's lookup by key.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: Union[str, None] = "0011"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("resume_object_key", sa.String(length=1024), nullable=True))
        batch.add_column(sa.Column("resume_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("resume_sha256")
        batch.drop_column("resume_object_key")
