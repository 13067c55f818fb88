"""The privacy ledger's entries and their hash chains."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import aliased

from ppml.db.models import (
    DatasetBudget,
    LedgerAcknowledgement,
    LedgerEntry,
)
from ppml.db.repositories.base import Page, Queries
from ppml.errors import InvalidInput

_SEQ_TOKEN = re.compile(r"[0-9]{1,18}")  # a ledger page token: the last seq served

# Built once: every admission's transaction runs it under the budget's lock.
_LEDGER_HEAD = (
    select(LedgerEntry.seq, LedgerEntry.entry_hash)
    .where(LedgerEntry.dataset_id == bindparam("dataset_id"))
    .order_by(LedgerEntry.seq.desc())
    .limit(1)
)

_HASH_AT = aliased(LedgerEntry)
_LEDGER_HEAD_AND_HASH_AT = _LEDGER_HEAD.add_columns(
    select(_HASH_AT.entry_hash)
    .where(_HASH_AT.dataset_id == bindparam("dataset_id"), _HASH_AT.seq == bindparam("seq"))
    .scalar_subquery()
)


class LedgerQueries(Queries):
    """Ledger entries, chains, acknowledgements."""

    # --- ledger -----------------------------------------------------------------------
    def insert_ledger_entries(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert entries given as their columns in one bulk statement, now (the staged rows
        they refer to, their jobs, are flushed first)."""
        if rows:
            self.insert_rows(LedgerEntry, rows)

    def ledger_entry(self, idempotency_key: str) -> LedgerEntry | None:
        return self.session.scalar(
            select(LedgerEntry).where(LedgerEntry.idempotency_key == idempotency_key)
        )

    def ledger_entries(self, dataset_id: str) -> Sequence[LedgerEntry]:
        """The dataset's entries in chain order (``seq``): ids made in the same millisecond
        do not sort by time."""
        stmt = select(LedgerEntry).where(LedgerEntry.dataset_id == dataset_id)
        return self.session.scalars(stmt.order_by(LedgerEntry.seq)).all()

    def job_ledger_entries(self, job_id: str) -> Sequence[LedgerEntry]:
        """The job's entries in chain order (by dataset, then ``seq``): ids made in the same
        millisecond, as a settlement's commit and release are, do not sort by time."""
        stmt = select(LedgerEntry).where(LedgerEntry.job_id == job_id)
        return self.session.scalars(stmt.order_by(LedgerEntry.dataset_id, LedgerEntry.seq)).all()

    def newest_ledger_entry(self, dataset_id: str) -> LedgerEntry | None:
        """The dataset's newest ledger entry, the head of its chain (signed receipts bind
        it). Read under the budget row's lock, so no entry is appended meanwhile."""
        stmt = select(LedgerEntry).where(LedgerEntry.dataset_id == dataset_id)
        return self.session.scalars(stmt.order_by(LedgerEntry.seq.desc()).limit(1)).first()

    def list_ledger(self, dataset_id: str, *, page_size: int, page_token: str | None) -> Page:
        """A page of the dataset's entries in chain order (``seq``: ids made in the same
        millisecond do not sort by time); the token is the last ``seq`` served."""
        stmt = select(LedgerEntry).where(LedgerEntry.dataset_id == dataset_id)
        after = None
        if page_token is not None:
            if not _SEQ_TOKEN.fullmatch(page_token):  # a seq fits a bigint
                raise InvalidInput("not a page token of this ledger", field="page_token")
            after = int(page_token)
        return self._page(stmt, LedgerEntry.seq, page_size, after, descending=False)

    # --- the ledger's hash chains (ppml.privacy.chain) ---------------------------------
    def ledger_head(self, dataset_id: str) -> tuple[int, str] | None:
        """``(seq, entry_hash)`` of the dataset's last chained entry (None: no entries): one
        probe of the ``(dataset_id, seq)`` index."""
        row = self.session.execute(_LEDGER_HEAD, {"dataset_id": dataset_id}).first()
        return None if row is None else (int(row[0]), str(row[1]))

    def ledger_head_and_hash_at(
        self, dataset_id: str, seq: int
    ) -> tuple[tuple[int, str] | None, str | None]:
        """:meth:`ledger_head` and :meth:`ledger_hash_at` ``seq``, in one statement."""
        params = {"dataset_id": dataset_id, "seq": seq}
        row = self.session.execute(_LEDGER_HEAD_AND_HASH_AT, params).first()
        if row is None:
            return None, None
        return (int(row[0]), str(row[1])), None if row[2] is None else str(row[2])

    def ledger_hash_at(self, dataset_id: str, seq: int) -> str | None:
        """The ``entry_hash`` of the dataset's entry ``seq``, or None."""
        stmt = select(LedgerEntry.entry_hash).where(
            LedgerEntry.dataset_id == dataset_id, LedgerEntry.seq == seq
        )
        return self.session.scalar(stmt)

    def ledger_chain(self, dataset_id: str) -> Sequence[LedgerEntry]:
        """The dataset's entries in chain order."""
        stmt = select(LedgerEntry).where(LedgerEntry.dataset_id == dataset_id)
        return self.session.scalars(stmt.order_by(LedgerEntry.seq)).all()

    def ledger_dataset_ids(self) -> list[str]:
        """Every dataset with ledger entries, or a budget (an empty chain)."""
        with_entries = select(LedgerEntry.dataset_id).distinct()
        with_budget = select(DatasetBudget.dataset_id)
        ids = set(self.session.scalars(with_entries)) | set(self.session.scalars(with_budget))
        return sorted(ids)

    def ledger_acknowledgements(self, dataset_id: str) -> Sequence[LedgerAcknowledgement]:
        stmt = select(LedgerAcknowledgement).where(LedgerAcknowledgement.dataset_id == dataset_id)
        return self.session.scalars(stmt.order_by(LedgerAcknowledgement.id)).all()
