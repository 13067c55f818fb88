"""secrets at rest: a dataset's split secret is stored sealed, longer than its 64 hex digits

A sealed secret reads ``v1:<key id>:<base64 of nonce, ciphertext and tag>`` (about 100
characters; ``ppml.datasets.keys.seal_secret``), so the column becomes TEXT. The values are
sealed by ``ppml serve`` / ``ppml db upgrade`` after the migrations (they need the data key,
which migrations never read): ``ppml.services.datasets.seal_split_secrets``.

Revision ID: d0c9b1e2f3a4
Revises: b8f7a9c0d1e2
Create Date: 2026-12-07 04:40:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d0c9b1e2f3a4"
down_revision: str | None = "b8f7a9c0d1e2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.alter_column("split_secret", existing_type=sa.String(length=64), type_=sa.Text())


def downgrade() -> None:
    # Fails on PostgreSQL while a sealed secret is stored: the older code could not read it.
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.alter_column("split_secret", existing_type=sa.Text(), type_=sa.String(length=64))
