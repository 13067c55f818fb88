"""dataset ingestion: validating / ready / invalid states and the reason of an invalid upload

Revision ID: e5c3f4a6d7b8
Revises: d4b2e3f5c6a7
Create Date: 2026-12-07 03:20:00+00:00
"""

from collections.abc import Sequence

revision: str = "e5c3f4a6d7b8"
down_revision: str | None = "d4b2e3f5c6a7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
