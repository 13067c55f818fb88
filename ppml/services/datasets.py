"""Registering datasets: built-ins and uploads become validated arrays plus a budget.

Each dataset gets a secret (``split_secret``, never released) that keys its train/test
split and its simulated federated partitions, and a declared schema whose classes are the
released label set (PRIVACY.md, "Every release is a mechanism").
"""

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

__all__ = ["BudgetRequest", "declared_classes", "register_builtin", "register_upload"]


@dataclass(frozen=True, kw_only=True)
class BudgetRequest:
    epsilon: float
    delta: float


def _population(unit: str, arrays: data.DatasetArrays) -> tuple[int, str]:
    """n, every protected unit (held-out ones included), and a sentence naming them."""
    if unit == "client":
        if arrays.num_clients is None or arrays.num_test_clients is None:
            raise InvalidInput("a client-level budget needs a client column", field="privacy_unit")
        train, test, kind = arrays.num_clients, arrays.num_test_clients, "clients"
    else:
        train, test, kind = arrays.n_train, arrays.n_test, "records"
    return train + test, f"{train} training and {test} held-out {kind}"


def _check_budget(budget: BudgetRequest | None, *, unit: str, arrays: data.DatasetArrays) -> None:
    if budget is None:
        return
    population, counted = _population(unit, arrays)
    if budget.delta >= 1 / population:
        raise InvalidInput(
            f"delta must be well below 1/n = {1 / population:.3g} for this dataset "
            f"(n = {population}: {counted}, every protected unit): otherwise a mechanism "
            "could publish a whole unit's data and still satisfy it",
            field="privacy_budget.delta",
        )


def declared_classes(dataset: Dataset) -> list[str]:
    """The dataset's declared label set (older rows: their stored class list)."""
    schema = dataset.data_schema or {}
    return [str(c) for c in schema.get("classes", dataset.classes.get("labels", []))]


def _check_validation(
    repos: Repositories,
    validation_dataset_id: str | None,
    *,
    tenant_id: str,
    arrays: data.DatasetArrays,
) -> None:
    """A validation set must be the tenant's public data, shaped and labelled alike."""
    if validation_dataset_id is None:
        return
    other = repos.dataset(tenant_id, validation_dataset_id)
    problem = None
    if other is None:
        problem = "names no dataset of this tenant"
    elif other.epsilon_total is not None or other.delta_total is not None:
        problem = "must name public data (a dataset without a privacy budget)"
    elif other.num_features != arrays.num_features:
        problem = "must name a dataset with the same number of features"
    elif declared_classes(other) != list(arrays.classes):
        problem = "must name a dataset that declares the same classes, in the same order"
    if problem is not None:
        raise InvalidInput(f"validation_dataset_id {problem}", field="validation_dataset_id")


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
    secret: str,
    validation_dataset_id: str | None,
) -> Dataset:
    _check_budget(budget, unit=unit, arrays=arrays)
    _check_validation(repos, validation_dataset_id, tenant_id=tenant_id, arrays=arrays)
    schema = data.DatasetSchema(classes=list(arrays.classes))
    dataset_id = new_id("ds")
    key = f"datasets/{dataset_id}.npz"
    store.write(key, lambda path: data.save_arrays(arrays, path))
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
        num_test_clients=arrays.num_test_clients,
        classes={"labels": list(schema.classes)},  # kept for older readers
        data_schema=schema.model_dump(),
        split_secret=secret,
        validation_dataset_id=validation_dataset_id,
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
    validation_dataset_id: str | None = None,
) -> Dataset:
    """Registers a built-in; its classes are the fixed set it declares (``BUILTIN_CLASSES``)."""
    secret = data.new_secret()
    arrays = data.load_builtin(builtin, seed=0, cache=store, secret=secret, unit=unit)
    return _store(
        repos,
        store,
        arrays,
        tenant_id=tenant_id,
        name=name,
        source={"builtin": builtin},
        budget=budget,
        unit=unit,
        secret=secret,
        validation_dataset_id=validation_dataset_id,
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
    schema: data.DatasetSchema | None = None,
    validation_dataset_id: str | None = None,
) -> Dataset:
    """Registers an upload. Budgeted data must declare its ``schema``: the released classes
    are the declared ones, never the distinct values of the private target column."""
    if budget is not None and schema is None:
        raise InvalidInput(
            'data with a privacy budget must declare its schema, e.g. {"classes": ["a", "b"]}',
            field="schema",
        )
    with staged.open("rb") as handle:
        head = handle.read(8)
    file_format = data.detect_format(filename, head)
    limits = data.UploadLimits(
        max_rows=settings.limits.max_rows,
        max_columns=settings.limits.max_columns,
        max_classes=settings.limits.max_classes,
    )
    secret = data.new_secret()
    arrays = data.parse_upload(
        staged,
        file_format=file_format,
        target=target,
        client_column=client_column,
        limits=limits,
        secret=secret,
        unit=unit,
        schema=schema,
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
        secret=secret,
        validation_dataset_id=validation_dataset_id,
    )
