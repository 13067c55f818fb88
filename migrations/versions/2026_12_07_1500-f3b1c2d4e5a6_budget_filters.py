"""dataset_budgets: a versioned admission filter per budget (issue #17, usable budgets).

Budgets that already have ledger entries keep ``uniform-v1``, the filter they were charged
under (δ split evenly over the grid's orders), so their semantics do not change. Budgets with
no entry at all have released nothing yet, so their filter may still be chosen: they move to
``anchored-v1`` with the anchor of their (ε_total, δ_total) (docs/privacy.md, "The admission
filter").

Revision ID: f3b1c2d4e5a6
Revises: e1f2a3b4c5d6
Create Date: 2026-12-07 15:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ppml.privacy.filters import ANCHORED, anchor_order

revision: str = "f3b1c2d4e5a6"
down_revision: str | None = "e1f2a3b4c5d6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_budgets = sa.table(
    "dataset_budgets",
    sa.column("dataset_id", sa.String()),
    sa.column("epsilon_total", sa.Float()),
    sa.column("delta_total", sa.Float()),
    sa.column("admission_filter", sa.String()),
    sa.column("filter_anchor", sa.Float()),
)
_entries = sa.table("ledger_entries", sa.column("dataset_id", sa.String()))


def _anchor_fresh_budgets() -> None:
    conn = op.get_bind()
    charged = sa.select(_entries.c.dataset_id).distinct()
    fresh = conn.execute(
        sa.select(_budgets.c.dataset_id, _budgets.c.epsilon_total, _budgets.c.delta_total).where(
            _budgets.c.dataset_id.not_in(charged)
        )
    ).all()
    for dataset_id, epsilon_total, delta_total in fresh:
        conn.execute(
            _budgets.update()
            .where(_budgets.c.dataset_id == dataset_id)
            .values(
                admission_filter=ANCHORED,
                filter_anchor=anchor_order(epsilon_total, delta_total),
            )
        )


def upgrade() -> None:
    with op.batch_alter_table("dataset_budgets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "admission_filter",
                sa.String(length=32),
                server_default="uniform-v1",
                nullable=False,
            )
        )
        batch_op.add_column(sa.Column("filter_anchor", sa.Float(), nullable=True))
    _anchor_fresh_budgets()


def downgrade() -> None:
    # Going back forgets the anchored filters: the old code admits every budget under
    # uniform-v1, which docs/privacy.md does not prove for budgets already charged under
    # anchored-v1. Downgrade only while no anchored budget has been charged.
    with op.batch_alter_table("dataset_budgets", schema=None) as batch_op:
        batch_op.drop_column("filter_anchor")
        batch_op.drop_column("admission_filter")
