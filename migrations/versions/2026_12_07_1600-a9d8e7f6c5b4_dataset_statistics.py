"""datasets.statistics and dataset-level ledger entries (issue #17, DP standardisation).

A dataset's standardisation statistics are charged once, to no job: ``ledger_entries.job_id``
becomes nullable (NULL marks a dataset-level entry; its idempotency key names the dataset).
Existing entries keep their job; the chain hashes a NULL job as ``null``, so their hashes do
not change.

Revision ID: a9d8e7f6c5b4
Revises: f3b1c2d4e5a6
Create Date: 2026-12-07 16:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "a9d8e7f6c5b4"
down_revision: str | None = "f3b1c2d4e5a6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("statistics", JSON, nullable=True))
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.String(length=40), nullable=True)


def downgrade() -> None:
    # Dataset-level entries have no job to point at, and dropping them would break the
    # chain: the downgrade refuses while any exists.
    conn = op.get_bind()
    found = conn.execute(sa.text("SELECT COUNT(*) FROM ledger_entries WHERE job_id IS NULL"))
    if found.scalar_one():
        raise RuntimeError("dataset-level ledger entries exist; they cannot be downgraded")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.String(length=40), nullable=False)
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("statistics")
