"""Registering datasets: built-ins and uploads become validated arrays plus a budget.

Built-ins are registered in the request. Uploads are accepted in the request only as far as
their headers go (:mod:`ppml.services.uploads`); the ingestion task
(:mod:`ppml.services.ingestion`) decodes them outside the API.

Each dataset gets a secret (``split_secret``, never released, stored sealed under the data
key: ``ppml.datasets.keys.seal_secret``) that keys its train/test split and its simulated
federated partitions, and a declared schema whose classes are the released label set
(PRIVACY.md, "Every release is a mechanism").
"""

from __future__ import annotations

from dataclasses import dataclass

from ppml import datasets as data
from ppml.config import Settings
from ppml.db.models import Dataset, DatasetStatus, new_id
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import DatasetDeleted, DatasetNotReady, InvalidInput, StorageQuotaExceeded
from ppml.privacy.ledger import Ledger
from ppml.services import audit
from ppml.services.fingerprints import check_not_registered, fingerprint_of
from ppml.services.tenants import Principal
from ppml.storage import ArtifactStore
from ppml.trust.sealing import DataKeys

__all__ = [
    "BudgetRequest",
    "check_budget",
    "check_quota",
    "check_validation",
    "declared_classes",
    "register_builtin",
    "require_live",
    "require_ready",
    "seal_split_secrets",
]


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


def check_budget(budget: BudgetRequest | None, *, unit: str, arrays: data.DatasetArrays) -> None:
    """δ must be well below 1/n, n counting every protected unit (held-out ones too)."""
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


def check_validation(
    repos: Repositories,
    validation_dataset_id: str | None,
    *,
    tenant_id: str,
    arrays: data.DatasetArrays | None,
) -> None:
    """A validation set must be the tenant's ready public data, shaped and labelled alike
    (``arrays`` None: the checks that need no data, when an upload is accepted)."""
    if validation_dataset_id is None:
        return
    other = repos.dataset(tenant_id, validation_dataset_id)
    problem = None
    if other is None or other.deleted_at is not None:
        problem = "names no dataset of this tenant"
    elif other.epsilon_total is not None or other.delta_total is not None:
        problem = "must name public data (a dataset without a privacy budget)"
    elif other.status != DatasetStatus.READY:
        problem = f"must name a ready dataset (it is {other.status})"
    elif arrays is None:
        problem = None
    elif other.num_features != arrays.num_features:
        problem = "must name a dataset with the same number of features"
    elif declared_classes(other) != list(arrays.classes):
        problem = "must name a dataset that declares the same classes, in the same order"
    if problem is not None:
        raise InvalidInput(f"validation_dataset_id {problem}", field="validation_dataset_id")


def check_quota(repos: Repositories, settings: Settings, tenant_id: str, size: int) -> None:
    limit = settings.limits.max_tenant_storage_bytes
    used = repos.tenant_stored_bytes(tenant_id)
    if used + size > limit:
        raise StorageQuotaExceeded(
            f"this tenant stores {used} bytes of datasets; {size} more would pass its quota "
            f"of {limit} bytes",
            stored_bytes=used,
            upload_bytes=size,
            limit=limit,
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
    secret: str,
    keys: DataKeys,
    validation_dataset_id: str | None,
    fingerprint: str,
    input_shape: tuple[int, ...] | None = None,
) -> Dataset:
    check_budget(budget, unit=unit, arrays=arrays)
    check_validation(repos, validation_dataset_id, tenant_id=tenant_id, arrays=arrays)
    # Under the tenant row's lock (taken by the quota check): one registration at a time.
    check_not_registered(
        repos, tenant_id=tenant_id, fingerprint=fingerprint, budgeted=budget is not None
    )
    data.check_input_shape(input_shape, arrays.num_features)
    schema = data.DatasetSchema(
        classes=list(arrays.classes),
        input_shape=None if input_shape is None else list(input_shape),
    )
    dataset_id = new_id("ds")
    key = f"datasets/{dataset_id}.npz"
    artifact = store.write(key, lambda path: data.save_arrays(arrays, path))
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
        split_secret=data.seal_secret(keys, dataset_id, secret),
        validation_dataset_id=validation_dataset_id,
        privacy_unit=unit,
        epsilon_total=budget.epsilon if budget else None,
        delta_total=budget.delta if budget else None,
        storage_key=key,
        status=DatasetStatus.READY,
        stored_bytes=artifact.size,
        fingerprint=fingerprint,
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
    by: Principal | None = None,
) -> Dataset:
    """Registers a built-in; its classes are the fixed set it declares (``BUILTIN_CLASSES``).

    Its rows are those of every registration of the same built-in, so a second budgeted
    registration of it by the tenant is refused (:mod:`ppml.services.fingerprints`).

    Args:
        by: Who registers it, for the audit trail (None: the admin).

    Raises:
        DatasetAlreadyRegistered: the tenant registered these rows with a budget before.
    """
    check_quota(repos, settings, tenant_id, 0)
    secret = data.new_secret()
    arrays = data.load_builtin(builtin, seed=0, cache=store, secret=secret, unit=unit)
    dataset = _store(
        repos,
        store,
        arrays,
        tenant_id=tenant_id,
        name=name,
        source={"builtin": builtin},
        budget=budget,
        unit=unit,
        secret=secret,
        keys=DataKeys.from_settings(settings),
        validation_dataset_id=validation_dataset_id,
        fingerprint=fingerprint_of(settings, tenant_id, arrays),
        input_shape=data.BUILTIN_INPUT_SHAPES.get(builtin),
    )
    detail = {"builtin": builtin, "budgeted": budget is not None, "privacy_unit": unit}
    audit.record(repos, by, "dataset.register", "dataset", dataset.id, detail, tenant_id=tenant_id)
    return dataset


def require_live(dataset: Dataset) -> None:
    """A deleted dataset answers 404 wherever it is named (its owner is told it was deleted)."""
    if dataset.deleted_at is not None:
        raise DatasetDeleted(
            f"dataset {dataset.id} was deleted; its ledger, budget and audit trail are kept",
            field="dataset_id",
            deleted_at=dataset.deleted_at.isoformat(),
        )


def require_ready(dataset: Dataset) -> None:
    """Jobs and budgets need a ready dataset: 409 while validating, or once invalid."""
    if dataset.status != DatasetStatus.READY:
        raise DatasetNotReady(
            f"dataset {dataset.id} is {dataset.status}; it takes jobs once it is ready",
            field="dataset_id",
            dataset_status=dataset.status,
        )


def seal_split_secrets(db: Database, keys: DataKeys, *, batch: int = 500) -> int:
    """Seal under the active data key every split secret still stored in plain text (rows
    written before sealing) or under a retired key; returns how many rows changed.

    Run at ``ppml serve`` and ``ppml db upgrade``; safe to run concurrently (each row is
    replaced only if it still holds what was read).

    Raises:
        ppml.trust.sealing.UnknownKey: A secret is sealed under a key that is not configured.
    """
    changed, after = 0, ""
    while True:
        with db.session(write=True) as session:
            repos = Repositories(session)
            rows = repos.split_secrets_to_seal(keys.active_id, after=after, limit=batch)
            for dataset_id, stored in rows:
                secret = data.open_secret(keys, dataset_id, stored)
                assert secret is not None
                sealed = data.seal_secret(keys, dataset_id, secret)
                changed += repos.replace_split_secret(dataset_id, stored=stored, sealed=sealed)
        if len(rows) < batch:
            return changed
        after = rows[-1][0]
