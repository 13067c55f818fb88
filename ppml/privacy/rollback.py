"""What operators do about the ledger's chains: check them all, acknowledge a rollback.

``ppml db check`` verifies every chain (:func:`check_chains`): each entry's hash, ``seq``
continuity and links, and that each chain extends its head in the signed head file. A chain
behind the file (entries deleted, an older copy of the database restored) refuses admissions
on its dataset until ``ppml db acknowledge-rollback`` records the event
(:func:`acknowledge_rollback`: a ``ledger_acknowledgements`` row) and moves the file's head
back to the database's. Nothing here repairs a broken chain: its entries are the evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ppml.db.models import LedgerAcknowledgement, new_id, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import LedgerHeadsInvalid, NotFound
from ppml.privacy.chain import ChainBreak, Link
from ppml.privacy.heads import HeadFile, flush_all
from ppml.privacy.ledger import Ledger

__all__ = ["ChainReport", "acknowledge_rollback", "check_chains"]

ACKNOWLEDGE = "ppml db acknowledge-rollback"


@dataclass
class ChainReport:
    """What :func:`check_chains` found."""

    breaks: list[ChainBreak] = field(default_factory=list)
    behind: dict[str, str] = field(default_factory=dict)  # dataset → why
    head_file_invalid: str | None = None
    head_file_missing: bool = False  # while the database has entries

    @property
    def ok(self) -> bool:
        return not (self.breaks or self.behind or self.head_file_invalid)

    def problems(self) -> list[str]:
        """One line per problem, naming the dataset and the entry."""
        lines = [f"ledger chain broken: {found}" for found in self.breaks]
        lines += [
            f"ledger chain of dataset {dataset_id} is behind the signed head file: {why}; "
            f"if this was intended (a restored backup), run `{ACKNOWLEDGE} {dataset_id} "
            "--note ...`"
            for dataset_id, why in self.behind.items()
        ]
        if self.head_file_invalid is not None:
            lines.append(
                f"ledger head file is invalid: {self.head_file_invalid}; admissions are "
                f"refused on every dataset until `{ACKNOWLEDGE} --all --note ...`"
            )
        return lines

    def warnings(self) -> list[str]:
        if not self.head_file_missing:
            return []
        return [
            "the signed ledger head file is missing although the ledger has entries: a "
            "rollback of the database before now cannot be detected (the next ledger write "
            "creates the file)"
        ]


def check_chains(db: Database, head_file: HeadFile) -> ChainReport:
    """Verify every dataset's chain, and each against the head file (after this process's
    own commits reached it)."""
    flush_all()
    report = ChainReport()
    with db.session() as session:
        ledger = Ledger(Repositories(session))
        report.breaks = ledger.verify_chains()
        try:
            known = head_file.read()
        except LedgerHeadsInvalid as invalid:
            report.head_file_invalid, known = invalid.detail, {}
        report.behind = ledger.behind(known)
        if not head_file.exists():
            ids = ledger.repos.ledger_dataset_ids()
            report.head_file_missing = any(ledger.head(d).seq for d in ids)
    return report


def acknowledge_rollback(
    db: Database,
    head_file: HeadFile,
    dataset_ids: Sequence[str] | None,
    *,
    by: str,
    note: str,
) -> list[LedgerAcknowledgement]:
    """Record that the chains of ``dataset_ids`` (None: every dataset) are accepted as the
    database holds them, and move their heads in the file back to the database's.

    Only datasets whose chain is behind the file are acknowledged. A head file that does not
    verify can only be rebuilt whole (``dataset_ids=None``): every dataset is then recorded,
    and the invalid file is kept aside. Returns the rows written.
    """
    try:
        known: dict[str, Link] | None = head_file.read()
    except LedgerHeadsInvalid:
        if dataset_ids is not None:
            raise
        known = None
    with db.session(write=True) as session:
        ledger = Ledger(Repositories(session))
        targets = sorted(dataset_ids) if dataset_ids is not None else None
        if targets is None:
            targets = ledger.repos.ledger_dataset_ids()
        rows = []
        for dataset_id in targets:
            if ledger.lock(dataset_id) is None:  # lock order: budget rows, by id
                raise NotFound(f"dataset {dataset_id} has no privacy budget (no ledger)")
            was = None if known is None else known.get(dataset_id)
            if known is not None and (was is None or not ledger.behind({dataset_id: was})):
                continue  # not behind: nothing to acknowledge
            rows.append(_record(dataset_id, was, ledger.head(dataset_id), by=by, note=note))
        ledger.repos.add(*rows)
    # After the commit: the event is recorded before the evidence moves.
    heads = {row.dataset_id: Link(row.to_seq, row.to_head) for row in rows}
    if known is None:
        head_file.reset({d: link for d, link in heads.items() if link.seq > 0}, rebuild=True)
    elif heads:
        head_file.reset(heads)
    return rows


def _record(
    dataset_id: str, was: Link | None, head: Link, *, by: str, note: str
) -> LedgerAcknowledgement:
    return LedgerAcknowledgement(
        id=new_id("ack"),
        dataset_id=dataset_id,
        acknowledged_at=utcnow(),
        acknowledged_by=by,
        from_seq=None if was is None else was.seq,
        from_head=None if was is None else was.entry_hash,
        to_seq=head.seq,
        to_head=head.entry_hash,
        note=note,
    )
