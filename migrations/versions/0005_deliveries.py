"""Task deliveries on models, statistics and batches.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

``deliveries`` counts the deliveries of the row's task (``inspect_model``,
``compute_statistic``, ``merge_batch``) that started, and ``delivered_at`` is when the
last one started (NULL once it ended): a task that kills its worker is given up after
``PALIMPSEST_JOB_MAX_ATTEMPTS`` deliveries (``workers.deliveries``), and the reconciler
does not send a task again while a delivery is under way.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TABLES = ("models", "statistics", "batches")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("deliveries", sa.Integer(), server_default=sa.text("0"), nullable=False))
            batch.add_column(sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in reversed(TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("delivered_at")
            batch.drop_column("deliveries")
