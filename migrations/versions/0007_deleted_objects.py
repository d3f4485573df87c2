"""Deleted objects: the keys a DELETE left without a row, for the sweep.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24

``DELETE /v1/jobs/{id}``, ``/v1/batches/{id}`` and ``/v1/models/{id}`` delete rows at once
and record the object keys those rows named here; ``storage.deletion.sweep`` deletes an
object once its record is older than the grace period and no row names its key.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: Union[str, None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "deleted_objects",
        sa.Column("object_key", sa.String(length=1024), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("object_key", name=op.f("pk_deleted_objects")),
    )
    op.create_index(op.f("ix_deleted_objects_deleted_at"), "deleted_objects", ["deleted_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_deleted_objects_deleted_at"), table_name="deleted_objects")
    op.drop_table("deleted_objects")
