"""Accepting an upload: in the request only as far as its headers go (size, format, declared
schema, the decoded-size bound, the tenant's storage quota). The file is stored as it came
and the dataset is ``validating`` until the ingestion task (:mod:`ppml.services.ingestion`)
decodes it outside the API and makes it ``ready`` or ``invalid``.
"""

from __future__ import annotations

from pathlib import Path

from ppml import datasets as data
from ppml.config import Settings
from ppml.datasets.inspect import UploadShape, inspect_upload
from ppml.datasets.schema import check_bounds
from ppml.db.models import Dataset, DatasetStatus, new_id, utcnow
from ppml.db.repositories import Repositories
from ppml.errors import InvalidInput
from ppml.services import audit
from ppml.services.datasets import BudgetRequest, check_quota, check_validation
from ppml.services.tenants import Principal
from ppml.storage import ArtifactStore
from ppml.trust.sealing import DataKeys

__all__ = ["accept_upload", "raw_upload_key", "upload_limits"]


def _upload_input_shape(schema: data.DatasetSchema | None, upload: UploadShape) -> list[int] | None:
    """The input shape an upload declares: its schema's, or an NPZ image array's shape.

    Raises:
        InvalidInput: the declared shape does not hold the row's features, or differs from
            the image shape of the NPZ array ``x`` (``field="schema.input_shape"``).
    """
    declared = schema.input_shape if schema is not None else None
    if upload.row_shape is None:
        data.check_input_shape(declared, upload.features)
        return declared
    row_shape = list(upload.row_shape)
    raw = row_shape[1:] if row_shape[0] == 1 else row_shape  # (n, H, W) declares [1, H, W]
    if declared is not None and declared not in (row_shape, raw):
        raise InvalidInput(
            f"schema.input_shape {declared} differs from the shape of the images in array "
            f"'x', {row_shape}",
            field="schema.input_shape",
        )
    return row_shape


def upload_limits(settings: Settings) -> data.UploadLimits:
    """The upload limits of the settings."""
    limits = settings.limits
    return data.UploadLimits(
        max_rows=limits.max_rows,
        max_columns=limits.max_columns,
        max_classes=limits.max_classes,
        max_decoded_bytes=limits.max_decoded_bytes,
    )


def raw_upload_key(dataset: Dataset) -> str:
    """Where a validating upload's file is stored, as it came (deleted once validated)."""
    return f"uploads/{dataset.id}.{dataset.source['upload']['format']}"


def accept_upload(
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
    by: Principal | None = None,
) -> Dataset:
    """Accepts an upload as far as its headers go; the dataset is then ``validating``.

    Checked here, before anything is stored and without decoding the file: its format, its
    declared columns (CSV header, Parquet footer, NPZ ``.npy`` headers), its decoded-size
    bound (``limits.max_decoded_bytes``), the declared schema (its input shape against the
    columns, or against an NPZ image array's shape, which declares it when the schema does
    not) and the tenant's storage quota.
    The file is then published as it came, and the caller enqueues the ingestion task once
    the row is committed. Budgeted data must declare its ``schema``: the released classes
    are the declared ones, never the distinct values of the private target column.

    Raises:
        InvalidInput: a missing schema, an unreadable header, a missing column.
        PayloadTooLarge: too many rows or columns, or too much once decoded.
        StorageQuotaExceeded: the tenant's datasets and this file would pass its quota.
    """
    if budget is not None and schema is None:
        raise InvalidInput(
            'data with a privacy budget must declare its schema, e.g. {"classes": ["a", "b"]}',
            field="schema",
        )
    with staged.open("rb") as handle:
        head = handle.read(8)
    file_format = data.detect_format(filename, head)
    upload = inspect_upload(
        staged,
        file_format=file_format,
        target=target,
        client_column=client_column,
        limits=upload_limits(settings),
    )
    input_shape = _upload_input_shape(schema, upload)
    check_bounds(schema, upload.features)
    if schema is not None:
        schema = schema.model_copy(update={"input_shape": input_shape})
    check_validation(repos, validation_dataset_id, tenant_id=tenant_id, arrays=None)
    size = staged.stat().st_size
    source: dict[str, object] = {"upload": {"format": file_format}}
    if client_column is not None:
        source["client_column"] = True
    dataset_id = new_id("ds")
    dataset = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name,
        source=source,
        task="classification",
        # Placeholders until ready (the API shows null): see Dataset.status.
        num_features=0,
        num_classes=0,
        num_train=0,
        num_test=0,
        classes={"labels": list(schema.classes) if schema else []},
        data_schema=schema.model_dump() if schema else None,
        split_secret=data.seal_secret(
            DataKeys.from_settings(settings), dataset_id, data.new_secret()
        ),
        validation_dataset_id=validation_dataset_id,
        privacy_unit=unit,
        epsilon_total=budget.epsilon if budget else None,
        delta_total=budget.delta if budget else None,
        storage_key=f"datasets/{dataset_id}.npz",
        status=DatasetStatus.VALIDATING,
        ingest={"target": target, "client_column": client_column, "input_shape": input_shape},
        ingest_sent_at=utcnow(),
        stored_bytes=size,
    )
    key = raw_upload_key(dataset)
    # Published before the quota's lock on the tenant row, so no fsync runs under it.
    store.publish(staged, key)
    try:
        check_quota(repos, settings, tenant_id, size)
        repos.add(dataset)
    except BaseException:
        store.delete(key)
        raise
    detail = {"format": file_format, "bytes": size, "budgeted": budget is not None}
    audit.record(repos, by, "dataset.upload", "dataset", dataset.id, detail, tenant_id=tenant_id)
    return dataset
