"""federation_tasks.started_at: when the node first fetched the round's weights (issue #16).

A sample-level node charges its own ledger for a round right after that fetch, so the
server counts a round as spent by the node from then on (the receipt's per-node ε).

Revision ID: c4d5e6f7a8b9
Revises: b1e2f3a4c5d6
Create Date: 2026-12-07 18:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c4d5e6f7a8b9"
down_revision: str | None = "b1e2f3a4c5d6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "federation_tasks", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("federation_tasks", "started_at")
