"""job events: a persisted, per-job sequence of what the event stream sends

Revision ID: d4b2e3f5c6a7
Revises: c3a1f2e4b5d6
Create Date: 2026-12-07 03:10:00+00:00
"""

from collections.abc import Sequence

revision: str = "d4b2e3f5c6a7"
down_revision: str | None = "c3a1f2e4b5d6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
