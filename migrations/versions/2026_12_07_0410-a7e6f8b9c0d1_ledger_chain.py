"""tamper-evident ledger: a hash chain per dataset and rollback acknowledgements

Revision ID: a7e6f8b9c0d1
Revises: f6d5e7a8b9c0
Create Date: 2026-12-07 04:10:00+00:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from ppml.privacy.chain import GENESIS, entry_hash

revision: str = "a7e6f8b9c0d1"
down_revision: str | None = "f6d5e7a8b9c0"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_entries = sa.table(
    "ledger_entries",
    sa.column("id", sa.String()),
    sa.column("dataset_id", sa.String()),
    sa.column("job_id", sa.String()),
    sa.column("kind", sa.String()),
    sa.column("idempotency_key", sa.String()),
    sa.column("rdp", sa.JSON()),
    sa.column("event", sa.JSON()),
    sa.column("epsilon", sa.Float()),
    sa.column("note", sa.Text()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("seq", sa.Integer()),
    sa.column("prev_hash", sa.String()),
    sa.column("entry_hash", sa.String()),
)


def _chain_existing_entries() -> None:
    """Chain the entries written before this revision, per dataset, in the order they were
    written (created_at, then id), with the same hash function the ledger appends with."""
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_entries).order_by(_entries.c.dataset_id, _entries.c.created_at, _entries.c.id)
    ).mappings()
    links: list[dict[str, Any]] = []
    dataset_id, seq, prev = None, 0, GENESIS
    for row in rows:
        if row["dataset_id"] != dataset_id:
            dataset_id, seq, prev = row["dataset_id"], 0, GENESIS
        seq += 1
        digest = entry_hash(
            dataset_id=row["dataset_id"],
            job_id=row["job_id"],
            kind=row["kind"],
            idempotency_key=row["idempotency_key"],
            rdp=row["rdp"],
            event=row["event"],
            epsilon=row["epsilon"],
            note=row["note"],
            created_at=row["created_at"],
            seq=seq,
            prev_hash=prev,
        )
        links.append({"b_id": row["id"], "b_seq": seq, "b_prev": prev, "b_hash": digest})
        prev = digest
    if links:
        conn.execute(
            _entries.update()
            .where(_entries.c.id == sa.bindparam("b_id"))
            .values(
                seq=sa.bindparam("b_seq"),
                prev_hash=sa.bindparam("b_prev"),
                entry_hash=sa.bindparam("b_hash"),
            ),
            links,
        )


def upgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("entry_hash", sa.String(length=64), nullable=True))
    _chain_existing_entries()
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.alter_column("seq", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("entry_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint("uq_ledger_entries_dataset_seq", ["dataset_id", "seq"])
    op.create_table(
        "ledger_acknowledgements",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acknowledged_by", sa.String(length=200), nullable=False),
        sa.Column("from_seq", sa.Integer(), nullable=True),
        sa.Column("from_head", sa.String(length=64), nullable=True),
        sa.Column("to_seq", sa.Integer(), nullable=False),
        sa.Column("to_head", sa.String(length=64), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_acknowledgements")),
    )
    with op.batch_alter_table("ledger_acknowledgements", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ledger_acknowledgements_dataset_id"), ["dataset_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("ledger_acknowledgements", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_acknowledgements_dataset_id"))
    op.drop_table("ledger_acknowledgements")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_constraint("uq_ledger_entries_dataset_seq", type_="unique")
        for column in ("entry_hash", "prev_hash", "seq"):
            batch_op.drop_column(column)
