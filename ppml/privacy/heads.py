"""The newest head of every dataset's ledger chain, kept outside the database and signed.

A hash chain shows an edited entry, but not a chain cut short: deleting the newest entries, or
restoring an older copy of the database, leaves a chain that verifies. So the service also
keeps each chain's newest head (``seq`` and ``entry_hash``) in a small JSON file outside the
database (``Settings.ledger_heads_path``, by default ``<data dir>/ledger-heads.json``), signed
with the service's key (:mod:`ppml.trust.keys`). Admission refuses a dataset whose chain in the
database does not extend the head in the file (:class:`~ppml.errors.LedgerRollback`) until an
operator acknowledges it (:mod:`ppml.privacy.rollback`), and a file whose signature does not
verify refuses every admission (:class:`~ppml.errors.LedgerHeadsInvalid`).

The file moves after the transaction that appended entries commits, and only forward: under a
file lock, each writer merges its heads into the file's, keeping the higher ``seq`` per dataset,
so API processes and workers that share the file may write it in any order. A head moves the
file only if the chain it ends extends the file's head (checked when the transaction first
appends to the dataset, under the budget lock): entries appended to a rolled-back chain never
overwrite the evidence. The database is never behind the file in normal operation; a crash
between the commit and the write leaves it ahead, which is harmless.

A commit does not wait for the file: it hands its heads to the process's writer thread
(:meth:`HeadFile.advance_soon`), which writes whatever heads have gathered since its last
write in one signed write. Under load, one write (a signature and an ``fsync``) then serves
many admissions; the file trails the database by the time of one write, a few milliseconds,
which only means that a rollback to a copy of the database taken within those milliseconds
goes unseen. :func:`flush_all` waits for the writers (a process's exit does too).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from ppml.config import Settings
from ppml.db.models import utcnow
from ppml.db.session import Database
from ppml.errors import LedgerHeadsInvalid
from ppml.privacy.chain import Link
from ppml.trust.keys import SigningKeys, canonical, verify

__all__ = ["HeadFile", "attach", "flush_all", "head_file_of", "written"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_HEAD_FILE = "ppml.ledger.head_file"  # Database.info / Session.info: the process's HeadFile
_WRITTEN = "ppml.ledger.written"  # Session.info: the chain heads of the open transaction


def _parse(text: str) -> tuple[dict[str, Any], dict[str, Link]]:
    """The document and its heads; raises ValueError (or KeyError, TypeError) if malformed."""
    document = json.loads(text)
    if document.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown format version {document.get('version')!r}")
    heads = {
        str(dataset_id): Link(int(link["seq"]), str(link["entry_hash"]))
        for dataset_id, link in document["heads"].items()
    }
    return document, heads


class HeadFile:
    """The signed head file; one instance per process (it caches what it last verified)."""

    def __init__(self, path: Path, keys: SigningKeys) -> None:
        self.path, self.keys = path, keys
        # (inode, mtime, ctime, size) of the file as last read → its heads, or why it is
        # invalid
        self._cache: tuple[tuple[int, ...], dict[str, Link] | str] | None = None
        # The identity of the file as this process last wrote it (under the file lock): its
        # heads are the ones it signed, so reading them back needs no verifying
        self._own: tuple[int, ...] | None = None
        # Heads committed but not yet written, and the writer thread that writes them
        self._pending: dict[str, Link] = {}
        self._writing = False
        self._writer: threading.Thread | None = None
        self._changed = threading.Condition()
        _LIVE.add(self)

    @classmethod
    def of(cls, settings: Settings) -> HeadFile:
        return cls(settings.ledger_heads_path, SigningKeys.for_settings(settings))

    def exists(self) -> bool:
        return self.path.exists()

    def read(self, *, fresh: bool = False) -> dict[str, Link]:
        """The verified heads ({} when there is no file yet); raises LedgerHeadsInvalid.

        Cheap when the file did not change: one ``stat`` (``fresh`` reads and verifies it
        regardless, as writers do under the lock, unless it is still the file this process
        wrote last: the heads it signed itself).
        """
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return {}
        key = _identity(stat)
        cached = self._cache
        if cached is None or cached[0] != key or (fresh and key != self._own):
            known = cached
            cached = (key, self._verified(self.path.read_text()))
            self._cache = cached
            if isinstance(cached[1], str) and (known is None or known[0] != key):
                log.error("ledger head file %s is invalid: %s", self.path, cached[1])
        if isinstance(cached[1], str):
            raise LedgerHeadsInvalid(
                f"the signed ledger head file does not verify ({cached[1]}); no job is "
                "admitted until an operator runs `ppml db acknowledge-rollback --all`",
            )
        return dict(cached[1])

    def _verified(self, text: str) -> dict[str, Link] | str:
        """The heads, or why the text is not a head file this service signed."""
        try:
            document, heads = _parse(text)
            signed = {k: document[k] for k in ("version", "signed_at", "heads")}
            signed_at = datetime.fromisoformat(document["signed_at"])
            problem = verify(
                self.keys.public_keys(),
                canonical(signed),
                document["signature"],
                signed_at=signed_at,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"malformed: {exc}"
        return heads if problem is None else problem

    def advance(self, links: Mapping[str, Link]) -> None:
        """Move heads forward (a head with a lower or equal ``seq`` than the file's is
        ignored). An invalid file is left as it is, as evidence."""
        with self._locked():
            try:
                heads = self.read(fresh=True)
            except LedgerHeadsInvalid:
                return
            moved = {d: link for d, link in links.items() if link.seq > heads.get(d, _NONE).seq}
            if moved:
                self._write({**heads, **moved})

    def advance_soon(self, links: Mapping[str, Link]) -> None:
        """:meth:`advance`, by the writer thread: returns at once. Heads queued while a write
        is under way go into the next one together."""
        with self._changed:
            for dataset_id, link in links.items():
                if link.seq > self._pending.get(dataset_id, _NONE).seq:
                    self._pending[dataset_id] = link
            if self._writer is None or not self._writer.is_alive():  # first use, or forked
                self._writer = threading.Thread(
                    target=self._write_pending, name="ppml-ledger-heads", daemon=True
                )
                self._writer.start()
            self._changed.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every head queued by :meth:`advance_soon` is written (or failed to be,
        which is logged); False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._pending and not self._writing, timeout=timeout
            )

    def _write_pending(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._pending))
                batch, self._pending = self._pending, {}
                self._writing = True
            try:
                self.advance(batch)
            except Exception:  # the commits stand; the database is merely ahead of the file
                log.exception("could not move the ledger head file %s", self.path)
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()

    def reset(self, links: Mapping[str, Link], *, rebuild: bool = False) -> None:
        """Set heads, backwards too (an operator's acknowledgement). ``rebuild`` replaces the
        whole file, an invalid one included (kept aside as ``<name>.invalid-<time>``)."""
        with self._locked():
            if rebuild:
                if self.path.exists():
                    try:
                        self.read(fresh=True)
                    except LedgerHeadsInvalid:
                        stamp = utcnow().strftime("%Y%m%dT%H%M%S%fZ")
                        os.replace(
                            self.path, self.path.with_name(f"{self.path.name}.invalid-{stamp}")
                        )
                self._write(dict(links))
            else:
                self._write({**self.read(fresh=True), **links})

    def _write(self, heads: Mapping[str, Link]) -> None:
        self.keys.public_keys()  # the first key exists before the time it signs at
        document: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "signed_at": utcnow().isoformat(),
            "heads": {d: heads[d].as_dict() for d in sorted(heads)},
        }
        document["signature"] = self.keys.sign(canonical(document)).as_dict()
        staged = self.path.with_name(f".{self.path.name}.tmp")
        with staged.open("w") as handle:
            # One line, by json's C encoder (an indent makes it take the Python one): the
            # file is rewritten after every batch of ledger appends.
            handle.write(json.dumps(document, sort_keys=True))
            handle.flush()
            os.fsync(handle.fileno())  # never a renamed empty file after a crash
        os.replace(staged, self.path)
        # Under the file lock: no other writer replaced it since. The next read (admission
        # checks it under every budget lock) then costs a stat, not a signature check.
        own = _identity(os.stat(self.path))
        self._cache = (own, dict(heads))
        self._own = own

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_name(f".{self.path.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    """What tells one version of the file from another: inode, times and size."""
    return (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)


_NONE = Link(-1, "")
_LIVE: weakref.WeakSet[HeadFile] = weakref.WeakSet()  # for flush_all


def flush_all(timeout: float = 10.0) -> bool:
    """Wait until every head file of this process has written the heads queued so far."""
    return all([head_file.flush(timeout) for head_file in list(_LIVE)])


atexit.register(flush_all, 5.0)  # a process that ends writes what it committed


def attach(db: Database, settings: Settings) -> HeadFile:
    """Have every unit of work on ``db`` check appends against, and move after its commit, the
    head file of ``settings`` (the services that append to the ledger call it)."""
    current = db.info.get(_HEAD_FILE)
    if isinstance(current, HeadFile) and current.path == settings.ledger_heads_path:
        return current
    head_file = HeadFile.of(settings)
    db.info[_HEAD_FILE] = head_file
    return head_file


def head_file_of(session: Session) -> HeadFile | None:
    head_file = session.info.get(_HEAD_FILE)
    return head_file if isinstance(head_file, HeadFile) else None


@dataclass
class Written:
    """What the open transaction knows of the chains it appends to."""

    heads: dict[str, Link] = field(default_factory=dict)  # newest link per dataset
    appended: set[str] = field(default_factory=set)  # datasets it appended to
    pushable: set[str] = field(default_factory=set)  # whose chain extends the file's head


def written(session: Session) -> Written:
    """The open transaction's chain heads (forgotten when it ends)."""
    found = session.info.get(_WRITTEN)
    if not isinstance(found, Written):
        found = session.info[_WRITTEN] = Written()
    return found


@event.listens_for(Session, "after_commit")
def _move_heads(session: Session) -> None:
    done = session.info.pop(_WRITTEN, None)
    head_file = head_file_of(session)
    if not isinstance(done, Written) or head_file is None:
        return
    links = {d: done.heads[d] for d in done.appended & done.pushable}
    if links:
        head_file.advance_soon(links)


@event.listens_for(Session, "after_transaction_end")
def _forget_heads(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # rolled back, or committed (then already popped)
        session.info.pop(_WRITTEN, None)
