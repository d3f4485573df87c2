"""Unique tenant names.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24

``palimpsest keys create --tenant NAME`` finds a tenant by name, so two tenants with one
name split a team's keys and jobs between them. Two concurrent ``keys create`` calls could
make such a pair before this revision. The oldest tenant of a name keeps it (it is the
one ``keys create`` has been adding keys to); each later one is renamed ``NAME (ten_...)``,
keeping its id, keys and jobs, so that nothing is merged behind an operator's back.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

NAME_LENGTH = 200


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.text("SELECT id, name FROM tenants ORDER BY name, created_at, id")).all()
    seen = set()
    for tenant_id, name in rows:
        if name in seen:
            suffix = f" ({tenant_id})"
            connection.execute(sa.text("UPDATE tenants SET name = :name WHERE id = :id"),
                               {"name": name[:NAME_LENGTH - len(suffix)] + suffix, "id": tenant_id})
        seen.add(name)
    with op.batch_alter_table("tenants") as batch:
        batch.create_unique_constraint("uq_tenants_name", ["name"])


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_constraint("uq_tenants_name", type_="unique")
