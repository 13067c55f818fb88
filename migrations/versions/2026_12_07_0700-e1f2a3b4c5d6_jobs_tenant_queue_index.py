"""jobs: the (tenant_id, status) index gains queued_at, so a fair claim finds a tenant's
oldest queued job with one probe (``Repositories.next_queued_job``); its prefix serves every
query the old index served.

Revision ID: e1f2a3b4c5d6
Revises: c521a224ba0e
Create Date: 2026-12-07 07:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "e1f2a3b4c5d6"
down_revision: str | None = "c521a224ba0e"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_jobs_tenant_status_queued_at", ["tenant_id", "status", "queued_at"], unique=False
        )
        batch_op.drop_index("ix_jobs_tenant_status")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_tenant_status", ["tenant_id", "status"], unique=False)
        batch_op.drop_index("ix_jobs_tenant_status_queued_at")
