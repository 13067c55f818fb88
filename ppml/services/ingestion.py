"""Ingestion: a worker decodes a validating upload and makes its dataset ready or invalid.

The API stored the upload as it came (:func:`ppml.services.uploads.accept_upload`); here,
outside the API process, the file is parsed and validated, split with the dataset's secret,
and published as the dataset's ``.npz``; the counts are filled in and the budget is opened,
and the dataset is ``ready``. A user error (anything :class:`~ppml.errors.PPMLError`) makes
it ``invalid`` with the problem as its reason (type, title, detail and field: never a value
from the data). Either way the stored upload is deleted: of an invalid upload nothing is
kept but the reason.

Safe to run twice: only a validating dataset is ingested, and every step can be repeated.
An attempt holds the dataset for ``worker.ingest_lease_s`` (a duplicate delivery meanwhile
exits); after that a re-sent task may try again. Each attempt is counted, and a file that
kills its worker is made invalid after ``worker.max_attempts`` attempts instead of looping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ppml import datasets as data
from ppml.config import Settings
from ppml.datasets.keys import open_secret
from ppml.datasets.schema import check_bounds
from ppml.db.models import Dataset, DatasetStatus, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import UNAVAILABLE, Database
from ppml.errors import PPMLError
from ppml.privacy.ledger import Ledger
from ppml.services.datasets import BudgetRequest, check_budget, check_validation
from ppml.services.fingerprints import check_not_registered, fingerprint_of
from ppml.services.uploads import raw_upload_key, upload_limits
from ppml.storage import ArtifactStore
from ppml.trust.sealing import DataKeys, UnknownKey

__all__ = ["ingest_upload", "problem_of"]

log = logging.getLogger(__name__)


def problem_of(exc: PPMLError) -> dict[str, Any]:
    """The reason an upload is invalid, as stored on the dataset (rendered as problem+json)."""
    problem: dict[str, Any] = {"code": exc.code, "title": exc.title, "detail": exc.detail}
    field = getattr(exc, "field", None)
    if field is not None:
        problem["field"] = field
    problem.update({k: v for k, v in exc.extra.items() if k not in problem})
    return problem


_INTERNAL = {
    "code": "ingestion-failed",
    "title": "Upload could not be validated",
    "detail": "the upload could not be validated because of an internal error; upload it again",
}


@dataclass(frozen=True)
class _Claim:
    """What one attempt needs, read from the row (the row itself stays in its session)."""

    dataset_id: str
    tenant_id: str
    attempts: int
    file_format: str
    raw_key: str
    npz_key: str
    target: str | None
    client_column: str | None
    secret: str  # as the row stores it (sealed): opened where it is used
    unit: str
    schema: data.DatasetSchema | None
    budget: BudgetRequest | None
    input_shape: list[int] | None  # declared, or an NPZ image array's (accept_upload)


def ingest_upload(db: Database, store: ArtifactStore, settings: Settings, dataset_id: str) -> str:
    """Validate a validating upload; returns the dataset's status afterwards.

    Returns ``"missing"`` for an unknown id, and the current status of a dataset that is not
    validating (a duplicate delivery), after deleting any upload file it left behind.

    Raises:
        The database's transient errors (``ppml.db.session.UNAVAILABLE``): the caller retries.
    """
    claim = _claim(db, store, dataset_id, lease_s=settings.worker.ingest_lease_s)
    if isinstance(claim, str):
        return claim
    if claim.attempts > settings.worker.max_attempts:
        detail = f"validating the upload stopped its worker {claim.attempts - 1} times"
        return _invalid(db, store, claim, {**_INTERNAL, "detail": detail})
    try:
        if not store.exists(claim.raw_key):
            return _invalid(db, store, claim, {**_INTERNAL, "detail": "the upload was lost"})
        with store.open_plain(claim.raw_key) as path:  # sealed at rest: a decrypted copy
            arrays = data.parse_upload(
                path,
                file_format=claim.file_format,
                target=claim.target,
                client_column=claim.client_column,
                limits=upload_limits(settings),
                secret=open_secret(
                    DataKeys.from_settings(settings), claim.dataset_id, claim.secret
                ),
                unit=claim.unit,
                schema=claim.schema,
            )
        check_budget(claim.budget, unit=claim.unit, arrays=arrays)
        data.check_input_shape(claim.input_shape, arrays.num_features)
        check_bounds(claim.schema, arrays.num_features)
        fingerprint = fingerprint_of(settings, claim.tenant_id, arrays)
        artifact = store.write(claim.npz_key, lambda out: data.save_arrays(arrays, out))
        status = _ready(db, claim, arrays, artifact.size, fingerprint)
        if status != DatasetStatus.READY:  # deleted (or gone) meanwhile: keep no arrays
            store.delete(claim.npz_key)
    except PPMLError as exc:
        return _invalid(db, store, claim, problem_of(exc))
    except UNAVAILABLE:
        raise
    except UnknownKey:
        # This worker lacks the data key the upload was sealed with: a configuration error,
        # not the upload's. It stays validating (and stored) until a worker with the key
        # takes it up again (the reaper re-sends it).
        log.error("dataset %s: sealed under a data key this worker does not have", dataset_id)
        raise
    except Exception:  # a bug, not the user's: logged here, never shown
        log.exception("dataset %s: ingestion failed", dataset_id)
        return _invalid(db, store, claim, dict(_INTERNAL))
    store.delete(claim.raw_key)
    log.info("dataset %s: %s", dataset_id, status)
    return status


def _claim(db: Database, store: ArtifactStore, dataset_id: str, *, lease_s: float) -> _Claim | str:
    """Take the dataset for one attempt, unless it is done or another attempt holds it."""
    now = utcnow()
    with db.session(write=True) as session:
        row = Repositories(session).lock_dataset(dataset_id)
        if row is None:
            return "missing"
        if row.status != DatasetStatus.VALIDATING:
            status = str(row.status)
            key = raw_upload_key(row) if "upload" in row.source else None
        elif row.ingest_started_at and row.ingest_started_at > now - timedelta(seconds=lease_s):
            return str(row.status)  # a duplicate while an attempt runs: leave it that one
        else:
            row.ingest_attempts += 1
            row.ingest_started_at = now
            return _claim_of(row)
    if key is not None:
        store.delete(key)  # a run that ended the dataset may have stopped before this
    return status


def _claim_of(row: Dataset) -> _Claim:
    ingest = row.ingest or {}
    budget = None
    if row.epsilon_total is not None and row.delta_total is not None:
        budget = BudgetRequest(epsilon=row.epsilon_total, delta=row.delta_total)
    schema = data.DatasetSchema.model_validate(row.data_schema) if row.data_schema else None
    assert row.split_secret is not None
    return _Claim(
        dataset_id=row.id,
        tenant_id=row.tenant_id,
        attempts=row.ingest_attempts,
        file_format=str(row.source["upload"]["format"]),
        raw_key=raw_upload_key(row),
        npz_key=row.storage_key,
        target=ingest.get("target"),
        client_column=ingest.get("client_column"),
        secret=row.split_secret,
        unit=row.privacy_unit,
        schema=schema,
        budget=budget,
        input_shape=ingest.get("input_shape"),
    )


def _ready(
    db: Database,
    claim: _Claim,
    arrays: data.DatasetArrays,
    stored_bytes: int,
    fingerprint: str,
) -> str:
    """Fill in the counts, open the budget and make the dataset ready, in one transaction.

    Raises:
        InvalidInput: the validation set no longer matches (checked under the row's lock).
        DatasetAlreadyRegistered: the tenant registered these rows with a budget before
            (checked under the tenant row's lock, so two uploads of one file cannot both pass).
    """
    with db.session(write=True) as session:
        repos = Repositories(session)
        repos.lock_tenant(claim.tenant_id)  # lock order: tenant, then dataset
        row = repos.lock_dataset(claim.dataset_id)
        if row is None or row.status != DatasetStatus.VALIDATING:
            return "missing" if row is None else str(row.status)
        check_validation(repos, row.validation_dataset_id, tenant_id=claim.tenant_id, arrays=arrays)
        check_not_registered(
            repos,
            tenant_id=claim.tenant_id,
            fingerprint=fingerprint,
            budgeted=claim.budget is not None,
            excluding=row.id,
        )
        row.fingerprint = fingerprint
        classes = list(arrays.classes)
        row.num_features, row.num_classes = arrays.num_features, arrays.num_classes
        row.num_train, row.num_test = arrays.n_train, arrays.n_test
        row.num_clients, row.num_test_clients = arrays.num_clients, arrays.num_test_clients
        row.classes = {"labels": classes}  # kept for older readers
        row.data_schema = data.DatasetSchema(
            classes=classes, input_shape=claim.input_shape
        ).model_dump()
        row.stored_bytes = stored_bytes
        row.status = DatasetStatus.READY
        if claim.budget is not None:
            Ledger(repos).open_budget(
                dataset_id=row.id,
                epsilon_total=claim.budget.epsilon,
                delta_total=claim.budget.delta,
                unit=claim.unit,
            )
    return str(DatasetStatus.READY)


def _invalid(db: Database, store: ArtifactStore, claim: _Claim, problem: dict[str, Any]) -> str:
    """Keep the reason, nothing else: the stored upload and any arrays are deleted."""
    with db.session(write=True) as session:
        row = Repositories(session).lock_dataset(claim.dataset_id)
        status = "missing" if row is None else str(row.status)
        if row is not None and row.status == DatasetStatus.VALIDATING:
            row.status, row.problem, row.stored_bytes = DatasetStatus.INVALID, problem, 0
            status = str(DatasetStatus.INVALID)
    if status == DatasetStatus.INVALID:
        store.delete(claim.npz_key)
    store.delete(claim.raw_key)
    log.info("dataset %s: invalid (%s)", claim.dataset_id, problem.get("code"))
    return status
