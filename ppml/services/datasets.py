"""Registering datasets: built-ins and uploads become validated arrays plus a budget."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ppml import datasets as data
from ppml.config import Settings
from ppml.db.models import Dataset, new_id
from ppml.db.repositories import Repositories
from ppml.errors import InvalidInput
from ppml.privacy.ledger import Ledger
from ppml.storage import ArtifactStore

__all__ = ["BudgetRequest", "register_builtin", "register_upload"]


@dataclass(frozen=True, kw_only=True)
class BudgetRequest:
    epsilon: float
    delta: float


def _check_budget(budget: BudgetRequest | None, *, unit: str, arrays: data.DatasetArrays) -> None:
    if budget is None:
        return
    if unit == "client" and arrays.num_clients is None:
        raise InvalidInput("a client-level budget needs a client column", field="privacy_unit")
    population = arrays.num_clients if unit == "client" else arrays.n_train
    assert population is not None
    if budget.delta >= 1 / population:
        raise InvalidInput(
            f"delta must be well below 1/n = {1 / population:.3g} for this dataset "
            f"({population} training {'clients' if unit == 'client' else 'records'}): "
            "otherwise a mechanism could publish a whole record and still satisfy it",
            field="privacy_budget.delta",
        )


def _store(
    repos: Repositories,
    store: ArtifactStore,
    arrays: data.DatasetArrays,
    *,
    tenant_id: str,
    name: str,
    source: dict[str, object],
    budget: BudgetRequest | None,
    unit: str,
) -> Dataset:
    _check_budget(budget, unit=unit, arrays=arrays)
    dataset_id = new_id("ds")
    key = f"datasets/{dataset_id}.npz"
    with store.staging(".npz") as staged:
        data.save_arrays(arrays, staged)
        store.publish(staged, key)
    dataset = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name,
        source=source,
        task="classification",
        num_features=arrays.num_features,
        num_classes=arrays.num_classes,
        num_train=arrays.n_train,
        num_test=arrays.n_test,
        num_clients=arrays.num_clients,
        classes={"labels": list(arrays.classes)},
        privacy_unit=unit,
        epsilon_total=budget.epsilon if budget else None,
        delta_total=budget.delta if budget else None,
        storage_key=key,
    )
    try:
        repos.add(dataset)
        if budget is not None:
            Ledger(repos).open_budget(
                dataset_id=dataset_id,
                epsilon_total=budget.epsilon,
                delta_total=budget.delta,
                unit=unit,
            )
    except Exception:
        store.delete(key)
        raise
    return dataset


def register_builtin(
    repos: Repositories,
    store: ArtifactStore,
    settings: Settings,
    *,
    tenant_id: str,
    name: str,
    builtin: str,
    budget: BudgetRequest | None,
    unit: str = "record",
) -> Dataset:
    arrays = data.load_builtin(builtin, seed=0, cache_dir=settings.data_dir / "cache")
    return _store(
        repos,
        store,
        arrays,
        tenant_id=tenant_id,
        name=name,
        source={"builtin": builtin},
        budget=budget,
        unit=unit,
    )


def register_upload(
    repos: Repositories,
    store: ArtifactStore,
    settings: Settings,
    *,
    tenant_id: str,
    name: str,
    staged: Path,
    filename: str,
    target: str | None,
    client_column: str | None,
    budget: BudgetRequest | None,
    unit: str = "record",
) -> Dataset:
    with staged.open("rb") as handle:
        head = handle.read(8)
    file_format = data.detect_format(filename, head)
    limits = data.UploadLimits(
        max_rows=settings.limits.max_rows,
        max_columns=settings.limits.max_columns,
        max_classes=settings.limits.max_classes,
    )
    arrays = data.parse_upload(
        staged, file_format=file_format, target=target, client_column=client_column, limits=limits
    )
    source: dict[str, object] = {"upload": {"format": file_format}}
    if client_column is not None:
        source["client_column"] = True
    return _store(
        repos,
        store,
        arrays,
        tenant_id=tenant_id,
        name=name,
        source=source,
        budget=budget,
        unit=unit,
    )
