"""api key lifecycle: expiry, revocation, last use

Revision ID: c3a1f2e4b5d6
Revises: b7d2c1e0a9f3
Create Date: 2026-12-07 03:00:00+00:00
"""

from collections.abc import Sequence

revision: str = "c3a1f2e4b5d6"
down_revision: str | None = "b7d2c1e0a9f3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
