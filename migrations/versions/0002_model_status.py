"""Models: status (pending | ready | failed) and error, for checkpoints inspected by a worker.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

An uploaded checkpoint stays ``pending`` until ``workers.models.inspect_model`` has
validated it. Rows that exist before this revision were registered by hand and are
usable, so the server default (which fills them) is ``ready``.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # batch mode: SQLite can add a CHECK constraint only by rebuilding the table
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("status", sa.String(length=20), server_default=sa.text("'ready'"),
                                   nullable=False))
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch.create_check_constraint(op.f("ck_models_status"), "status IN ('pending', 'ready', 'failed')")


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint(op.f("ck_models_status"), type_="check")
        batch.drop_column("error")
        batch.drop_column("status")
