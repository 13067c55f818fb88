"""fair sharing of workers: preemptions, a job's place in its tenant's line, each tenant's last
claim, and a job's compute estimate

Revision ID: f6d5e7a8b9c0
Revises: e5c3f4a6d7b8
Create Date: 2026-12-07 04:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f6d5e7a8b9c0"
down_revision: str | None = "e5c3f4a6d7b8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        # Claims that ended in a preemption: they do not count toward max_attempts.
        batch_op.add_column(
            sa.Column("preemptions", sa.Integer(), nullable=False, server_default="0")
        )
        # When the job last entered ``queued``: its place in its tenant's line.
        batch_op.add_column(sa.Column("queued_at", sa.DateTime(timezone=True)))
        # Estimated work (sample-gradients × parameters); None for jobs admitted before.
        batch_op.add_column(sa.Column("compute", sa.BigInteger()))
        batch_op.create_index("ix_jobs_status_queued_at", ["status", "queued_at"], unique=False)
    op.execute("UPDATE jobs SET queued_at = created_at")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        # When a worker last claimed one of the tenant's jobs: tenants served longest ago
        # are served first.
        batch_op.add_column(sa.Column("last_claim_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("last_claim_at")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_queued_at")
        for column in ("compute", "queued_at", "preemptions"):
            batch_op.drop_column(column)
