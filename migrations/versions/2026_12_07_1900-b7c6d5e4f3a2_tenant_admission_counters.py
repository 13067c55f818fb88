"""tenants.admitted_jobs and admitted_compute: admission counters (issue #19, performance).

Every admission adds its batch's jobs and compute estimates under the tenant's row lock, so
the last exact count of a tenant's queued and running jobs plus the counters' growth bounds
them from above, and admission skips the scan when that bound leaves room
(ppml.services.rooms). Existing tenants start at 0: a process counts once before it bounds.

Revision ID: b7c6d5e4f3a2
Revises: c4d5e6f7a8b9
Create Date: 2026-12-07 19:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7c6d5e4f3a2"
down_revision: str | None = "c4d5e6f7a8b9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("admitted_jobs", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("admitted_compute", sa.BigInteger(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("admitted_compute")
        batch_op.drop_column("admitted_jobs")
