"""The budget ledger: reserve at admission, commit what was run, release the rest.

Entries are append-only and keyed ``job_id:kind`` so a retried commit or release is a no-op.
Each dataset's budget row caches the fold of its entries:

* ``committed = Σ commit``
* ``reserved  = Σ reserve − Σ commit − Σ release``

Every mutation runs under the budget row's lock (``FOR UPDATE`` on PostgreSQL; the writer
session's ``BEGIN IMMEDIATE`` on SQLite) and updates entries and cache in one transaction.

Each dataset's entries form a hash chain (:mod:`ppml.privacy.chain`): an append reads the
chain's head under that lock and links the new entry to it. The newest heads are also kept,
signed, outside the database (:mod:`ppml.privacy.heads`); admission refuses a dataset whose
chain does not extend them (:meth:`Ledger.require_current`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ppml.db.models import DatasetBudget, Job, LedgerEntry, LedgerKind, new_id, utcnow
from ppml.db.repositories import Repositories
from ppml.errors import (
    BudgetExceeded,
    Conflict,
    LedgerHeadsInvalid,
    LedgerRollback,
    PrivacyUnitMismatch,
)
from ppml.privacy import accounting as acc
from ppml.privacy import chain, filters, heads
from ppml.privacy.budgets import budget_filter, budget_status, curve_of, units_of, used_curve

__all__ = ["Ledger"]

log = logging.getLogger(__name__)


class Ledger:
    """Ledger operations over one unit of work (the caller commits the transaction)."""

    def __init__(self, repos: Repositories, *, bulk: bool = False) -> None:
        """``bulk``: :meth:`reserve` keeps its entries as columns, which :meth:`write`
        inserts in one statement (a batch of admissions makes no ORM row per entry)."""
        self.repos = repos
        self._rows: list[dict[str, Any]] | None = [] if bulk else None
        # Entry hashes read under the budget locks this unit of work holds (they cannot
        # change while it holds them), by (dataset, seq)
        self._hashes: dict[tuple[str, int], str | None] = {}

    def write(self) -> None:
        """Insert the entries :meth:`reserve` kept (``bulk``), in chain order."""
        if self._rows:
            self.repos.insert_ledger_entries(self._rows)
            self._rows = []

    def open_budget(
        self, *, dataset_id: str, epsilon_total: float, delta_total: float, unit: str
    ) -> DatasetBudget:
        check = filters.new_filter(epsilon_total, delta_total)
        budget = DatasetBudget(
            dataset_id=dataset_id,
            epsilon_total=epsilon_total,
            delta_total=delta_total,
            unit=unit,
            grid_version=acc.GRID_VERSION,
            admission_filter=check.version,
            filter_anchor=check.anchor,
            committed=units_of(acc.zero()),
            reserved=units_of(acc.zero()),
            version=0,
        )
        self.repos.add(budget)
        return budget

    def lock(self, dataset_id: str) -> DatasetBudget | None:
        return self.repos.budget(dataset_id, lock=True)

    def admits(self, budget: DatasetBudget, job_curve: Sequence[int]) -> bool:
        return budget_filter(budget).fits(used_curve(budget), job_curve)

    def refusal(
        self, budget: DatasetBudget, *, requested: float, job_curve: Sequence[int]
    ) -> BudgetExceeded:
        """The 409 for a job that does not fit (cheap: it is built under the lock).

        ``requested`` is the job's own ε. ε does not add up across jobs (curves compose), so
        the detail says what the dataset's composed ε would become, in the unit of
        ``epsilon_remaining`` (the filter's).
        """
        status = budget_status(budget)
        composed = budget_filter(budget).epsilon(acc.add(used_curve(budget), job_curve))
        return BudgetExceeded(
            f"This job would spend ε={requested:.4g}; composed with the dataset's earlier "
            f"jobs that makes ε={composed:.4g} as its admission filter counts it, above its "
            f"total of {status.epsilon_total:g} (ε={status.epsilon_remaining:.4g} is left).",
            epsilon_remaining=status.epsilon_remaining,
            epsilon_requested=requested,
        )

    def reserve(
        self, budget: DatasetBudget, job: Job, event: acc.MechanismEvent
    ) -> LedgerEntry | None:
        """Reserve a job's full curve on a locked budget; raises if the filter refuses.
        Returns the RESERVE entry (None with ``bulk``: :meth:`write` inserts it).

        A mechanism that protects another unit than the budget's is refused here too, not
        only at pricing: a client-level guarantee says nothing about one record's
        influence on a record-level budget (replace-one, not add/remove), and a
        record-level one nothing about a whole client.
        """
        if event.unit != budget.unit:
            raise PrivacyUnitMismatch(
                f"this job protects one {event.unit}, but the dataset's budget protects "
                f"one {budget.unit}: it cannot be charged there",
                job_unit=event.unit,
                budget_unit=budget.unit,
            )
        curve = acc.rdp_curve(event)
        if not self.admits(budget, curve):
            raise self.refusal(
                budget, requested=acc.epsilon(curve, budget.delta_total), job_curve=curve
            )
        entry = None
        if self._rows is None:
            entry = self._append(self._entry(budget, job.id, LedgerKind.RESERVE, curve, event))
        else:
            self._rows.append(self._entry(budget, job.id, LedgerKind.RESERVE, curve, event))
        budget.reserved = units_of(acc.add(curve_of(budget.reserved), curve))
        self._touch(budget)
        return entry

    def charge(
        self, budget: DatasetBudget, job_id: str | None, batch: str, event: acc.MechanismEvent
    ) -> LedgerEntry:
        """Charge a mechanism run now, on a locked budget: a RESERVE and its COMMIT entry
        (keys ``job_id:batch:kind``), so the fold and the chain treat it as any settled job.
        ``job_id`` None charges the dataset itself (keys ``dataset_id:batch:kind``), for a
        release that no job owns (its standardisation statistics).
        Raises BudgetExceeded, writing nothing, when the filter refuses. Returns the COMMIT.
        """
        if event.unit != budget.unit:
            raise PrivacyUnitMismatch(
                f"this mechanism protects one {event.unit}, but the dataset's budget protects "
                f"one {budget.unit}",
                job_unit=event.unit,
                budget_unit=budget.unit,
            )
        curve = acc.rdp_curve(event)
        if not self.admits(budget, curve):
            requested = acc.epsilon(curve, budget.delta_total)
            raise self.refusal(budget, requested=requested, job_curve=curve)
        key = f"{job_id or budget.dataset_id}:{batch}"
        self._append(self._entry(budget, job_id, LedgerKind.RESERVE, curve, event, key=key))
        commit = self._append(self._entry(budget, job_id, LedgerKind.COMMIT, curve, event, key=key))
        budget.committed = units_of(acc.add(curve_of(budget.committed), curve))
        self._touch(budget)
        return commit

    def settle(
        self, budget: DatasetBudget, job_id: str, *, steps: int | None, note: str
    ) -> tuple[LedgerEntry | None, LedgerEntry | None]:
        """Commit the curve of ``steps`` steps (None: the data was never touched) and
        release the rest. The job's evaluation releases are committed with any ``steps``,
        0 included: a job stopped before its first step may still have scored its model.

        Idempotent: a job is settled once; later calls return the existing entries.
        """
        reserve = self.repos.ledger_entry(f"{job_id}:{LedgerKind.RESERVE}")
        if reserve is None:
            return None, None
        existing_commit = self.repos.ledger_entry(f"{job_id}:{LedgerKind.COMMIT}")
        existing_release = self.repos.ledger_entry(f"{job_id}:{LedgerKind.RELEASE}")
        if existing_commit is not None or existing_release is not None:
            return existing_commit, existing_release
        reserved_curve = curve_of(reserve.rdp)
        planned = acc.MechanismEvent.from_dict(reserve.event)
        commit_entry = None
        committed = acc.zero()
        used_event = planned.with_steps(min(steps, planned.steps)) if steps is not None else None
        if used_event is not None and (
            used_event.steps or used_event.eval_releases or used_event.zcdp_rho
        ):
            # Fewer steps never cost more; min() only guards against numerical failures
            # at single orders (stored as "infinite") in the partial run.
            committed = tuple(
                min(a, b) for a, b in zip(acc.rdp_curve(used_event), reserved_curve, strict=True)
            )
            commit_entry = self._append(
                self._entry(budget, job_id, LedgerKind.COMMIT, committed, used_event)
            )
            budget.committed = units_of(acc.add(curve_of(budget.committed), committed))
        rest = acc.subtract(reserved_curve, committed)
        release_entry = self._append(
            self._entry(budget, job_id, LedgerKind.RELEASE, rest, planned, note=note)
        )
        budget.reserved = units_of(acc.subtract(curve_of(budget.reserved), reserved_curve))
        self._touch(budget)
        return commit_entry, release_entry

    def fold(self, dataset_id: str) -> tuple[acc.Curve, acc.Curve]:
        """Recompute ``(committed, reserved)`` from the entries alone."""
        committed, reserved = acc.zero(), acc.zero()
        for entry in self.repos.ledger_entries(dataset_id):
            curve = curve_of(entry.rdp)
            if entry.kind == LedgerKind.RESERVE:
                reserved = acc.add(reserved, curve)
            elif entry.kind == LedgerKind.COMMIT:
                committed = acc.add(committed, curve)
                reserved = acc.subtract(reserved, curve)
            else:
                reserved = acc.subtract(reserved, curve)
        return committed, reserved

    def require_current(self, dataset_id: str) -> None:
        """Refuse (409) admissions on a dataset whose chain in the database does not extend
        the head signed outside it; call it under the budget lock, before reserving.

        Raises LedgerRollback, or LedgerHeadsInvalid when the head file does not verify.
        Cheap: a ``stat`` of the head file and one index probe.
        """
        head_file = heads.head_file_of(self.repos.session)
        if head_file is None:
            return
        known = head_file.read().get(dataset_id)
        if known is None:
            return
        reason = self._behind(dataset_id, self._head(dataset_id), known)
        if reason is not None:
            log.error("dataset %s: ledger rollback detected: %s", dataset_id, reason)
            raise LedgerRollback(
                f"this dataset's privacy ledger is behind its signed chain head: {reason}. "
                "No job is admitted on it until an operator acknowledges the rollback.",
                dataset_id=dataset_id,
                ledger_seq=self._head(dataset_id).seq,
                signed_seq=known.seq,
            )

    def verify_chains(self) -> list[chain.ChainBreak]:
        """The first break of every dataset's chain whose hashes or links do not hold."""
        breaks = []
        for dataset_id in self.repos.ledger_dataset_ids():
            found = chain.verify_chain(dataset_id, self.repos.ledger_chain(dataset_id))
            if found is not None:
                log.error("ledger chain broken: %s", found)
                breaks.append(found)
        return breaks

    def behind(self, known: dict[str, chain.Link]) -> dict[str, str]:
        """Datasets whose chain does not extend their head in ``known`` (the head file's),
        with the reason."""
        found: dict[str, str] = {}
        for dataset_id, link in sorted(known.items()):
            reason = self._behind(dataset_id, self._head(dataset_id), link)
            if reason is not None:
                found[dataset_id] = reason
        return found

    def head(self, dataset_id: str) -> chain.Link:
        """The newest link of the dataset's chain, as this transaction leaves it."""
        return self._head(dataset_id)

    def verify(self, *, repair: bool = False) -> list[str]:
        """Dataset ids whose cached totals differ from the fold of their entries.

        With ``repair``, the cache is rebuilt from the entries (they are the truth).
        """
        mismatched = []
        for budget in self.repos.all_budgets():
            committed, reserved = self.fold(budget.dataset_id)
            if committed != curve_of(budget.committed) or reserved != curve_of(budget.reserved):
                mismatched.append(budget.dataset_id)
                log.error("ledger cache of dataset %s differs from its entries", budget.dataset_id)
                if repair:
                    budget.committed, budget.reserved = units_of(committed), units_of(reserved)
                    self._touch(budget)
        return mismatched

    def _append(self, columns: dict[str, Any]) -> LedgerEntry:
        """Stage the entry of :meth:`_entry`'s ``columns``: the transaction's commit (or its
        next query) flushes it with the rest."""
        entry = LedgerEntry(**columns)
        self.repos.stage(entry)
        return entry

    def _entry(
        self,
        budget: DatasetBudget,
        job_id: str | None,
        kind: LedgerKind,
        curve: Sequence[int],
        event: acc.MechanismEvent,
        *,
        note: str | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """The columns of the entry that extends the dataset's chain (its new head)."""
        if budget.grid_version != acc.GRID_VERSION:
            raise Conflict("the dataset's budget was priced on another grid of orders")
        previous = self._head(budget.dataset_id)
        fields: dict[str, Any] = {
            "dataset_id": budget.dataset_id,
            "job_id": job_id,
            "kind": kind,
            "idempotency_key": f"{key or job_id or budget.dataset_id}:{kind}",
            "rdp": units_of(curve),
            "event": event.to_dict(),
            "epsilon": float(acc.epsilon(curve, budget.delta_total)),
            "note": note,
            "created_at": utcnow(),
            "seq": previous.seq + 1,
            "prev_hash": previous.entry_hash,
        }
        fields["entry_hash"] = chain.entry_hash(**fields)
        fields["id"] = new_id("led")
        written = heads.written(self.repos.session)
        written.heads[budget.dataset_id] = chain.Link(fields["seq"], fields["entry_hash"])
        written.appended.add(budget.dataset_id)
        return fields

    def _head(self, dataset_id: str) -> chain.Link:
        """The chain's newest link: read once per transaction (under the budget lock), then
        kept with the transaction's other chain heads, staged appends included."""
        written = heads.written(self.repos.session)
        link = written.heads.get(dataset_id)
        if link is None:
            known = self._file_head(dataset_id)
            with self.repos.session.no_autoflush:  # staged rows stay staged: one flush
                if known is None or known.seq == 0:
                    found = self.repos.ledger_head(dataset_id)
                else:  # and the entry that _behind compares with the file's, at once
                    found, at_known = self.repos.ledger_head_and_hash_at(dataset_id, known.seq)
                    self._hashes[(dataset_id, known.seq)] = at_known
            link = chain.EMPTY if found is None else chain.Link(*found)
            written.heads[dataset_id] = link
            if self._extends_head_file(dataset_id, link):
                written.pushable.add(dataset_id)
        return link

    def _extends_head_file(self, dataset_id: str, link: chain.Link) -> bool:
        """Whether appends to this chain may move the head file (it extends the file's head).

        A chain behind the file still takes a worker's settlement (the charge is real), but
        its new head must not overwrite the evidence of the rollback.
        """
        head_file = heads.head_file_of(self.repos.session)
        if head_file is None:
            return False
        try:
            known = head_file.read().get(dataset_id)
        except LedgerHeadsInvalid:  # left as it is, as evidence
            return False
        if known is None:
            return True
        reason = self._behind(dataset_id, link, known)
        if reason is not None:
            log.error("dataset %s: the head file keeps its newer head: %s", dataset_id, reason)
        return reason is None

    def _file_head(self, dataset_id: str) -> chain.Link | None:
        """The head file's link for the dataset; None without one (or with an invalid file,
        which the callers that read it then report)."""
        head_file = heads.head_file_of(self.repos.session)
        try:
            return None if head_file is None else head_file.read().get(dataset_id)
        except LedgerHeadsInvalid:
            return None

    def _behind(self, dataset_id: str, link: chain.Link, known: chain.Link) -> str | None:
        # Asked twice per admission (may appends move the file; is the chain current), with
        # the entry at the file's seq that _head read with the chain's head.
        def hash_at(seq: int) -> str | None:
            if (dataset_id, seq) not in self._hashes:
                with self.repos.session.no_autoflush:
                    self._hashes[(dataset_id, seq)] = self.repos.ledger_hash_at(dataset_id, seq)
            return self._hashes[(dataset_id, seq)]

        return chain.behind(link, known, hash_at)

    @staticmethod
    def _touch(budget: DatasetBudget) -> None:
        budget.version += 1
        budget.updated_at = utcnow()
