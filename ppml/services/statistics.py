"""A dataset's DP standardisation statistics: charged once (owner's request), computed by the
first job that uses them, reused by every later job at no further cost.

The charge is a dataset-level RESERVE and COMMIT pair on the chained ledger
(:meth:`ppml.privacy.ledger.Ledger.charge` with no job), made under the budget lock before
any data is read: a charge the filter refuses is a 409 that writes nothing. The values are
drawn where the data is read, in the worker (:func:`ensure_released`), once: a conditional
update keeps the first draw, and a later or concurrent job reads that one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ppml.datasets import statistics as st
from ppml.db.models import Dataset
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.defaults import statistics_epsilon
from ppml.errors import Conflict, InvalidInput, NotFound
from ppml.privacy import accounting as acc
from ppml.privacy.ledger import Ledger
from ppml.privacy.zcdp import calibrate_zcdp
from ppml.services import audit
from ppml.services.datasets import require_live, require_ready
from ppml.services.tenants import Principal, require_owner

__all__ = [
    "StatisticsMissing",
    "ensure_released",
    "release_statistics",
    "require_statistics",
    "statistics_event",
    "statistics_of",
]


class StatisticsMissing(Conflict):
    code = "statistics-not-released"
    title = "Dataset statistics not released"


def statistics_of(dataset: Dataset) -> st.DatasetStatistics | None:
    """The dataset's statistics record, or None."""
    if dataset.statistics is None:
        return None
    return st.DatasetStatistics.model_validate(dataset.statistics)


def statistics_event(rho: float) -> acc.MechanismEvent:
    """The ledger's event of a statistics release spending ``rho`` (zCDP, no steps)."""
    return acc.MechanismEvent(
        sample_rate=1.0, noise_multiplier=0.0, steps=0, zcdp_rho=rho, mechanism=st.MECHANISM
    )


def _declared_bounds(
    dataset: Dataset, bounds: Sequence[Sequence[float]] | None
) -> tuple[list[tuple[float, float]] | None, str]:
    """Bounds from the request, the declared schema or a built-in's documentation."""
    from ppml.datasets.schema import declared_bounds

    if bounds is None:
        bounds = declared_bounds(dataset.data_schema)
    if bounds is not None:
        problem = st.bounds_problem(bounds, dataset.num_features)
        if problem is not None:
            raise InvalidInput(problem, field="bounds")
        return [(float(lo), float(hi)) for lo, hi in bounds], "declared"
    documented = _builtin_bounds(dataset)
    return (documented, "builtin") if documented is not None else (None, "dp")


def _builtin_bounds(dataset: Dataset) -> list[tuple[float, float]] | None:
    builtin = dataset.source.get("builtin") if isinstance(dataset.source, dict) else None
    if builtin not in ("digits", "breast_cancer"):
        return None
    from ppml.synthesis.table import builtin_bounds

    names = [f"x{j}" for j in range(dataset.num_features)]
    found = builtin_bounds(str(builtin), names)
    return [found[name] for name in names] if len(found) == len(names) else None


def _plan(
    dataset: Dataset, epsilon: float | None, bounds: list[tuple[float, float]] | None, source: str
) -> st.DatasetStatistics:
    d = dataset.num_features
    sensitivity = (2.0 * d) ** 0.5
    if dataset.epsilon_total is None:  # public data: exact statistics, nothing to protect
        if bounds is None:
            raise InvalidInput("public data needs declared bounds", field="bounds")
        return st.DatasetStatistics(
            status="pending", epsilon=None, rho=0.0, rho_bounds=0.0, noise_std=0.0,
            sensitivity=sensitivity, bounds_source=source, bounds=bounds,
        )  # fmt: skip
    if epsilon is None:  # the share the defaults' study chose (docs/defaults.md)
        epsilon = statistics_epsilon(dataset.epsilon_total)
    assert dataset.delta_total is not None
    try:
        rho = calibrate_zcdp(target_epsilon=epsilon, delta=dataset.delta_total)
    except ValueError:
        raise InvalidInput("no release reaches this epsilon", field="epsilon") from None
    rho_bounds = st.BOUNDS_SHARE * rho if bounds is None else 0.0
    return st.DatasetStatistics(
        status="pending", epsilon=epsilon, rho=rho, rho_bounds=rho_bounds,
        noise_std=st.moments_sigma(d, rho - rho_bounds), sensitivity=sensitivity,
        bounds_source=source, bounds=bounds,
    )  # fmt: skip


def release_statistics(
    db: Database,
    *,
    tenant_id: str,
    dataset_id: str,
    epsilon: float | None,
    bounds: Sequence[Sequence[float]] | None,
    by: Principal,
) -> st.DatasetStatistics:
    """Charge a dataset's standardisation statistics once (owner keys), in one writer
    transaction under the budget lock; the first job that uses them computes them.

    Raises Forbidden (analyst), NotFound, Conflict (already released, not ready),
    InvalidInput (bad bounds or epsilon), BudgetExceeded (the filter refuses); all write
    nothing.
    """
    with db.session(write=True) as session:
        repos = Repositories(session)
        ledger = Ledger(repos)
        budget = ledger.lock(dataset_id)  # first, as every charge: the budget, then rows
        dataset = repos.dataset_by_id(dataset_id)
        if dataset is None or dataset.tenant_id != tenant_id:
            raise NotFound("dataset not found")  # before the role: 404 across tenants
        require_owner(by, "only an owner key releases a dataset's statistics")
        require_live(dataset)
        require_ready(dataset)
        if dataset.privacy_unit != "record":
            # One client holds many rows: the sums' sensitivity of sqrt(2d) is per record.
            raise InvalidInput(
                "dataset statistics protect single records, but this dataset's budget "
                "protects whole clients",
                field="dataset_id",
            )
        if dataset.statistics is not None:
            raise Conflict("this dataset's statistics were released already; jobs reuse them")
        known, source = _declared_bounds(dataset, bounds)
        plan = _plan(dataset, epsilon, known, source)
        if budget is not None:
            ledger.require_current(dataset_id)
            entry = ledger.charge(budget, None, "statistics", statistics_event(plan.rho))
            plan.ledger_entry_id = entry.id
        dataset.statistics = plan.model_dump(mode="json")
        detail = {"epsilon": plan.epsilon, "bounds_source": source}
        audit.record(repos, by, "dataset.statistics", "dataset", dataset_id, detail)
    return plan


def require_statistics(db: Database, dataset_id: str) -> None:
    """Refuse (409) a job that standardises on a dataset whose statistics were never
    charged: admission charges nothing for them (the owner's request does, once)."""
    with db.read_one() as session:
        found = Repositories(session).dataset_by_id(dataset_id)
    if found is None or found.statistics is None:
        raise StatisticsMissing(
            "this job standardises its features, but the dataset's statistics were never "
            "released: its owner releases them once (POST /v1/datasets/{id}/statistics)",
            field="preprocessing.standardize",
        )


def ensure_released(
    db: Database, dataset_id: str, rows: Callable[[], np.ndarray]
) -> st.DatasetStatistics:
    """The dataset's released statistics, computed here from the training rows (``rows()``,
    read only then) if still pending
    (worker only: it reads the data). The first stored draw wins; a loser's draw is dropped
    unseen and it uses the stored one.

    Raises StatisticsMissing when none were charged.
    """
    with db.session() as session:
        found = Repositories(session).dataset_by_id(dataset_id)
        stats = statistics_of(found) if found is not None else None
    if stats is None:
        raise StatisticsMissing("the dataset's statistics were never released")
    if stats.status == "ready":
        return stats
    rng = np.random.default_rng()  # fresh OS entropy: the noise must stay secret
    x_train = rows()
    bounds = stats.bounds
    if bounds is None:
        from ppml.synthesis.table import dp_bounds

        columns = list(range(x_train.shape[1]))
        found_bounds = dp_bounds(x_train, columns, stats.rho_bounds, rng)
        bounds = [found_bounds[j] for j in columns]
    mean, std = st.release_moments(x_train, bounds, stats.noise_std, rng)
    ready = stats.model_copy(update={"status": "ready", "bounds": bounds, "mean": mean, "std": std})
    with db.session(write=True) as session:
        stored = Repositories(session).lock_dataset(dataset_id)
        current = statistics_of(stored) if stored is not None else None
        if stored is None or current is None:
            raise StatisticsMissing("the dataset is gone")
        if current.status == "ready":
            return current
        stored.statistics = ready.model_dump(mode="json")
    return ready
