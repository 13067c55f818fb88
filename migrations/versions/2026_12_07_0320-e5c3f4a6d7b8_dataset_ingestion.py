"""dataset ingestion: validating / ready / invalid states and the reason of an invalid upload

Revision ID: e5c3f4a6d7b8
Revises: d4b2e3f5c6a7
Create Date: 2026-12-07 03:20:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "e5c3f4a6d7b8"
down_revision: str | None = "d4b2e3f5c6a7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    # Datasets registered before were validated in the request: they are ready. Their stored
    # size is unknown to the database (0): the quota counts them from their next upload on.
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("status", sa.String(length=16), nullable=False, server_default="ready")
        )
        batch_op.add_column(sa.Column("problem", JSON, nullable=True))
        batch_op.add_column(sa.Column("ingest", JSON, nullable=True))
        batch_op.add_column(
            sa.Column("ingest_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("ingest_sent_at", sa.DateTime(timezone=True)))
        batch_op.add_column(sa.Column("ingest_started_at", sa.DateTime(timezone=True)))
        batch_op.add_column(
            sa.Column("stored_bytes", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.create_index(
            "ix_datasets_tenant_status", ["tenant_id", "status"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_index("ix_datasets_tenant_status")
        for column in (
            "stored_bytes",
            "ingest_started_at",
            "ingest_sent_at",
            "ingest_attempts",
            "ingest",
            "problem",
            "status",
        ):
            batch_op.drop_column(column)
