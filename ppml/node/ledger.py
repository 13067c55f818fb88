"""The node's own privacy ledger: ppml's schema on a SQLite file in the node's data directory,
charged with the service's own code (:class:`ppml.privacy.ledger.Ledger`).

The file holds one local tenant, one dataset row for the node's data (with its fingerprint) and
that dataset's budget (ε, δ), opened as the service opens an upload's. Each sample-level round
is charged with :meth:`Ledger.charge` (a RESERVE and its COMMIT, keyed by the server's task
id, so a task retried after a crash is never charged twice) before any training.

The ledger entries belong to no local job row (the job is the server's); which server job each
charge and each refusal belongs to is kept in the local audit trail (``audit_events``, object
id = the server's job id), written in the charge's transaction.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppml.datasets.arrays import DatasetArrays
from ppml.datasets.fingerprint import content_fingerprint
from ppml.db.migrate import upgrade
from ppml.db.models import AuditEvent, Dataset, DatasetBudget, Tenant, new_id, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import BudgetExceeded, InvalidInput
from ppml.node.data import LocalData
from ppml.privacy import accounting as acc
from ppml.privacy.budgets import budget_status, curve_of
from ppml.privacy.ledger import Ledger

__all__ = ["Charge", "LocalLedger", "Refusal", "prepare_accounting"]

TENANT_NAME = "local"
ACTOR = "node"
CHARGE, RECORD, REFUSE = "node.charge", "node.record", "node.refuse"
_MAX_EVENTS = 100_000


@dataclass(frozen=True, kw_only=True)
class Charge:
    """A round charged on the local ledger: its ε and the job's total so far, at ``delta``."""

    epsilon: float
    epsilon_total: float
    delta: float


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """Why the node refuses a task (sent to the server as ``{reason, message}``)."""

    reason: str
    message: str


class LocalLedger:
    """The node's ledger file (``ledger.sqlite`` in its data directory)."""

    def __init__(self, db: Database, *, tenant_id: str, dataset_id: str) -> None:
        self.db = db
        self.tenant_id = tenant_id
        self.dataset_id = dataset_id

    # --- opening ----------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: Path,
        *,
        fingerprint_key: bytes,
        data: LocalData,
        epsilon: float | None,
        delta: float | None,
        name: str,
    ) -> LocalLedger:
        """Open (creating and migrating on first use) the ledger at ``path`` for ``data``.

        The first start opens the dataset's budget (ε, δ); later starts must find the same
        rows (by fingerprint) and may leave ε and δ out, or must repeat them.

        Raises:
            InvalidInput: no budget on the first start, δ not below 1/rows, a budget that
                differs from the one opened, or data other than the ledger's.
        """
        url = f"sqlite:///{path}"
        upgrade(url)
        db = Database(url)
        with db.session(write=True) as session:
            repos = Repositories(session)
            tenant = repos.tenant_by_name(TENANT_NAME)
            if tenant is None:
                tenant = Tenant(id=new_id("ten"), name=TENANT_NAME, created_at=utcnow())
                repos.add(tenant)
            fp = content_fingerprint(_arrays_of(data), key=fingerprint_key, tenant_id=tenant.id)
            dataset = repos.budgeted_dataset_with_fingerprint(tenant.id, fp, excluding=None)
            if dataset is None:
                if repos.list_datasets(tenant.id, page_size=1, page_token=None)[0]:
                    raise InvalidInput(
                        "the data file differs from the one this node's ledger budgets (rows "
                        "were added, removed or changed). Its spent budget stays spent: use the "
                        "original file, or a new --data-dir only for data about other people.",
                        field="data",
                    )
                dataset = _new_dataset(repos, tenant.id, fp, data, epsilon, delta, name)
            else:
                _same_budget(repos.budget(dataset.id), epsilon, delta)
            return cls(db, tenant_id=tenant.id, dataset_id=dataset.id)

    def close(self) -> None:
        self.db.dispose()

    # --- reads ------------------------------------------------------------------------
    def remaining(self) -> float:
        """ε left, as the admission filter counts it."""
        with self.db.session() as session:
            budget = Repositories(session).budget(self.dataset_id)
            assert budget is not None
            return budget_status(budget).epsilon_remaining

    def budget(self) -> tuple[float, float]:
        """The budget's (ε, δ)."""
        with self.db.session() as session:
            budget = Repositories(session).budget(self.dataset_id)
            assert budget is not None
            return budget.epsilon_total, budget.delta_total

    def job_curve(self, job_id: str) -> acc.Curve:
        """The sum of the curves charged for a server job."""
        with self.db.session() as session:
            return self._job_curve(Repositories(session), job_id)

    def job_events(self, job_id: str) -> list[AuditEvent]:
        """The local record of a server job: its charges, records and refusals, oldest first."""
        with self.db.session() as session:
            return self._events(Repositories(session), job_id, None)

    def fits(self, *, job_id: str, rounds: int, event: acc.MechanismEvent) -> Refusal | None:
        """Whether a job's first charge would be admitted (the whole job must fit): None,
        or the refusal :meth:`charge_round` would give. Writes nothing; the node asks
        before it fetches a round's weights, which the server counts as a round started."""
        with self.db.session() as session:
            repos = Repositories(session)
            budget = repos.budget(self.dataset_id)
            assert budget is not None
            return self._refusal(repos, Ledger(repos), budget, job_id, acc.rdp_curve(event), rounds)

    # --- writes -----------------------------------------------------------------------
    def charge_round(
        self,
        *,
        job_id: str,
        task_id: str,
        round_index: int,
        rounds: int,
        event: acc.MechanismEvent,
        delta: float,
    ) -> Charge | Refusal:
        """Charge one sample-level round before it trains.

        At the job's first charge the whole job (``rounds`` times this round's curve) must fit
        the budget; else nothing is written and the refusal says why. The charge is keyed by
        the task id: charging a task again returns the first charge.
        """
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            ledger = Ledger(repos)
            budget = ledger.lock(self.dataset_id)
            assert budget is not None
            key = f"{self.dataset_id}:{task_id}"
            round_curve = acc.rdp_curve(event)
            if repos.ledger_entry(f"{key}:commit") is None:
                refusal = self._refusal(repos, ledger, budget, job_id, round_curve, rounds)
                if refusal is not None:
                    return refusal
                try:
                    commit = ledger.charge(budget, None, task_id, event)
                except BudgetExceeded:
                    return Refusal(reason="budget", message=self._message(budget, round_curve))
                repos.stage(
                    self._audit(
                        CHARGE,
                        job_id,
                        {
                            "task_id": task_id,
                            "round": round_index,
                            "entry": commit.id,
                            "key": commit.idempotency_key,
                            "epsilon": commit.epsilon,
                        },
                    )
                )
                session.flush()
            total = self._job_curve(repos, job_id)
            return Charge(
                epsilon=acc.epsilon(round_curve, delta),
                epsilon_total=acc.epsilon(total, delta),
                delta=delta,
            )

    def record(self, *, job_id: str, task_id: str, mode: str, round_index: int) -> None:
        """Record a task that charges nothing here (client level, or non-private)."""
        with self.db.session(write=True) as session:
            Repositories(session).add(
                self._audit(
                    RECORD, job_id, {"task_id": task_id, "mode": mode, "round": round_index}
                )
            )

    def refused(self, *, job_id: str, task_id: str, refusal: Refusal) -> None:
        """Record a refusal (the ledger itself is unchanged)."""
        with self.db.session(write=True) as session:
            Repositories(session).add(
                self._audit(
                    REFUSE,
                    job_id,
                    {"task_id": task_id, "reason": refusal.reason, "message": refusal.message},
                )
            )

    # --- helpers ----------------------------------------------------------------------
    def _refusal(
        self,
        repos: Repositories,
        ledger: Ledger,
        budget: DatasetBudget,
        job_id: str,
        round_curve: acc.Curve,
        rounds: int,
    ) -> Refusal | None:
        if self._events(repos, job_id, CHARGE):
            return None  # the whole job was checked at its first charge
        whole = acc.add(*([round_curve] * max(1, rounds)))
        if ledger.admits(budget, whole):
            return None
        return Refusal(reason="budget", message=self._message(budget, whole))

    @staticmethod
    def _message(budget: DatasetBudget, curve: Sequence[int]) -> str:
        wanted = acc.epsilon(curve, budget.delta_total)
        left = budget_status(budget).epsilon_remaining
        return (
            f"would spend ε={wanted:.4g} but this node has ε={left:.4g} left (of its "
            f"ε={budget.epsilon_total:g} at δ={budget.delta_total:g})"
        )

    def _job_curve(self, repos: Repositories, job_id: str) -> acc.Curve:
        curves = []
        for event in self._events(repos, job_id, CHARGE):
            entry = repos.ledger_entry(str(event.detail["key"]))
            if entry is not None:
                curves.append(curve_of(entry.rdp))
        return acc.add(*curves)

    def _events(self, repos: Repositories, job_id: str, action: str | None) -> list[AuditEvent]:
        rows, _ = repos.list_audit(
            self.tenant_id,
            action=action,
            object_id=job_id,
            page_size=_MAX_EVENTS,
            page_token=None,
        )
        return list(rows)

    def _audit(self, action: str, job_id: str, detail: dict[str, Any]) -> AuditEvent:
        return AuditEvent(
            id=new_id("aud"),
            tenant_id=self.tenant_id,
            actor_key_id=None,
            actor_role=ACTOR,
            action=action,
            object_type="job",
            object_id=job_id,
            detail=detail,
            created_at=utcnow(),
        )


def prepare_accounting() -> None:
    """Import the accountant now (dp-accounting and scipy: 0.9-2.2 s measured), not in the
    node's first round, whose budget check is the first to price a mechanism. The event
    priced here is a constant: no data, no task."""
    acc.rdp_curve(acc.MechanismEvent(sample_rate=0.5, noise_multiplier=1.0, steps=1, unit="record"))


def new_fingerprint_key() -> str:
    """A fresh key for the local data's fingerprint (hex, kept in node.json)."""
    return secrets.token_hex(32)


def _arrays_of(data: LocalData) -> DatasetArrays:
    return DatasetArrays(
        x_train=data.x,
        y_train=data.y,
        x_test=data.x[:0],
        y_test=data.y[:0],
        classes=data.classes,
        feature_names=data.feature_names,
    )


def _new_dataset(
    repos: Repositories,
    tenant_id: str,
    fingerprint: str,
    data: LocalData,
    epsilon: float | None,
    delta: float | None,
    name: str,
) -> Dataset:
    if epsilon is None or delta is None:
        raise InvalidInput(
            "the first start of a node opens its local budget: give --epsilon and --delta",
            field="epsilon",
        )
    if not epsilon > 0 or not 0 < delta < 1:
        raise InvalidInput("--epsilon must be > 0 and --delta in (0, 1)", field="epsilon")
    if delta >= 1 / data.rows:
        raise InvalidInput(
            f"--delta must be below 1/n = {1 / data.rows:.3g} for {data.rows} rows: a larger δ "
            "allows releasing a whole record outright",
            field="delta",
        )
    dataset = Dataset(
        id=new_id("ds"),
        tenant_id=tenant_id,
        name=name,
        source={"node": "local file"},
        task="classification",
        num_features=data.num_features,
        num_classes=len(data.classes),
        num_train=data.rows,
        num_test=0,
        num_clients=None,
        num_test_clients=None,
        classes={"labels": list(data.classes)},
        data_schema=None,
        privacy_unit="record",
        epsilon_total=epsilon,
        delta_total=delta,
        storage_key="",
        fingerprint=fingerprint,
    )
    repos.add(dataset)
    Ledger(repos).open_budget(
        dataset_id=dataset.id, epsilon_total=epsilon, delta_total=delta, unit="record"
    )
    return dataset


def _same_budget(budget: DatasetBudget | None, epsilon: float | None, delta: float | None) -> None:
    assert budget is not None
    if epsilon is not None and epsilon != budget.epsilon_total:
        raise InvalidInput(
            f"this node's ledger was opened with ε={budget.epsilon_total:g}; a budget is fixed "
            "once opened (leave --epsilon out, or repeat it)",
            field="epsilon",
        )
    if delta is not None and delta != budget.delta_total:
        raise InvalidInput(
            f"this node's ledger was opened with δ={budget.delta_total:g}; a budget is fixed "
            "once opened (leave --delta out, or repeat it)",
            field="delta",
        )
