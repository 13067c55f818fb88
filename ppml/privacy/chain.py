"""The ledger's hash chain: each entry carries the hash of the entry before it in its dataset.

An entry's ``entry_hash`` is SHA-256 over the canonical JSON (:func:`ppml.trust.keys.canonical`)
of its content: dataset, job, kind, idempotency key, RDP curve, mechanism event, ε (as its
``repr``), note, creation time (ISO 8601, UTC), its place ``seq`` in the dataset's chain
(1, 2, ...) and ``prev_hash``, the hash of entry ``seq - 1`` (:data:`GENESIS` for the first).
Editing any entry changes its hash, and so breaks the link from the entry after it; deleting
or re-hashing entries moves the chain's head, which is also kept, signed, outside the database
(:mod:`ppml.privacy.heads`). :func:`entry_hash` is the one definition, used when appending, when
verifying and by the migration that chained the entries written before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ppml.db.models import LedgerEntry
from ppml.trust.keys import canonical

__all__ = [
    "EMPTY",
    "GENESIS",
    "ChainBreak",
    "Link",
    "behind",
    "entry_hash",
    "hash_of",
    "verify_chain",
]

GENESIS = "0" * 64  # the prev_hash of a dataset's first entry
CHAIN_VERSION = 1  # part of what is hashed: a new encoding would not verify as the old one


@dataclass(frozen=True)
class Link:
    """A place in a dataset's chain: an entry's ``seq`` and ``entry_hash``."""

    seq: int
    entry_hash: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "entry_hash": self.entry_hash}


EMPTY = Link(0, GENESIS)  # the head of a chain with no entries


@dataclass(frozen=True)
class ChainBreak:
    """Where and why a dataset's chain does not hold."""

    dataset_id: str
    seq: int
    reason: str
    entry_id: str | None = None

    def __str__(self) -> str:
        entry = f" ({self.entry_id})" if self.entry_id else ""
        return f"dataset {self.dataset_id}, entry {self.seq}{entry}: {self.reason}"


def _instant(value: datetime) -> str:
    # SQLite hands datetimes back without their zone; every ledger time is UTC.
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat()


def entry_hash(
    *,
    dataset_id: str,
    job_id: str | None,
    kind: str,
    idempotency_key: str,
    rdp: Any,
    event: Any,
    epsilon: float,
    note: str | None,
    created_at: datetime,
    seq: int,
    prev_hash: str,
) -> str:
    """The hex SHA-256 of an entry's content and its link to the entry before it."""
    content = {
        "chain": CHAIN_VERSION,
        "dataset_id": dataset_id,
        "job_id": job_id,
        "kind": str(kind),
        "idempotency_key": idempotency_key,
        "rdp": rdp,
        "event": event,
        "epsilon": repr(float(epsilon)),
        "note": note,
        "created_at": _instant(created_at),
        "seq": int(seq),
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical(content)).hexdigest()


def hash_of(entry: LedgerEntry) -> str:
    """What ``entry.entry_hash`` must be, recomputed from the entry's content."""
    return entry_hash(
        dataset_id=entry.dataset_id,
        job_id=entry.job_id,
        kind=entry.kind,
        idempotency_key=entry.idempotency_key,
        rdp=entry.rdp,
        event=entry.event,
        epsilon=entry.epsilon,
        note=entry.note,
        created_at=entry.created_at,
        seq=entry.seq,
        prev_hash=entry.prev_hash,
    )


def verify_chain(dataset_id: str, entries: Iterable[LedgerEntry]) -> ChainBreak | None:
    """The first break in a dataset's chain (``entries`` in ``seq`` order), or None."""
    previous = EMPTY
    for entry in entries:
        expected = previous.seq + 1
        if entry.seq != expected:
            return ChainBreak(
                dataset_id,
                expected,
                f"entry {expected} is missing (the next entry is {entry.seq})",
            )
        if entry.prev_hash != previous.entry_hash:
            return ChainBreak(
                dataset_id,
                entry.seq,
                "it does not link to the entry before it (prev_hash differs)",
                entry.id,
            )
        if hash_of(entry) != entry.entry_hash:
            return ChainBreak(
                dataset_id,
                entry.seq,
                "its content does not match its hash (the entry was edited)",
                entry.id,
            )
        previous = Link(entry.seq, entry.entry_hash)
    return None


def behind(head: Link, known: Link, hash_at: Callable[[int], str | None]) -> str | None:
    """Why a chain whose newest link is ``head`` does not extend ``known`` (a head seen
    before, by the signed head file), or None when it does.

    ``hash_at(seq)`` answers the chain's ``entry_hash`` at ``seq`` (None: no such entry); it
    is asked only when the chain is longer than ``known``.
    """
    if known.seq == 0:  # the file knew an empty chain: every chain extends it
        return None
    if head.seq < known.seq:
        return (
            f"the database's chain ends at entry {head.seq}, but the signed head file saw "
            f"entry {known.seq}: entries were deleted or an older copy was restored"
        )
    found = head.entry_hash if head.seq == known.seq else hash_at(known.seq)
    if found != known.entry_hash:
        return (
            f"the database's entry {known.seq} is not the one the signed head file saw: "
            "the chain was rewritten or an older copy was restored and written to since"
        )
    return None
