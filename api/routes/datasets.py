"""Datasets: register built-ins, upload files, read budgets and ledgers."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import BackgroundTasks, Form, Path, Query, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.deps import (
    CurrentPrincipal,
    CurrentTenant,
    JobServiceDep,
    OwnedDataset,
    ReposDep,
    SettingsDep,
    StoreDep,
)
from api.routes.common import DEFAULT_PAGE_SIZE, PageSize, PageToken, Router, errors
from api.schemas import (
    Budget,
    Dataset,
    DatasetCreate,
    DatasetPage,
    DatasetProblem,
    DatasetSchema,
    LedgerEntry,
    LedgerPage,
    PrivacyBudget,
)
from api.schemas.datasets import VALIDATION_DATASET_DESCRIPTION
from ppml.datasets.schema import declared_bounds, parse_schema
from ppml.db import models
from ppml.errors import InvalidInput, NotFound, PayloadTooLarge
from ppml.privacy.budgets import budget_status
from ppml.queue import enqueue_ingestion
from ppml.services import datasets as service
from ppml.services import uploads
from ppml.services.deletion import delete_dataset as delete_dataset_files
from ppml.services.tenants import require_owner

# Budgeted data is the owner's to register: an analyst sees only what mechanisms release.
BUDGET_NEEDS_OWNER = (
    "registering a dataset with a privacy budget needs an owner key; "
    "an analyst key may register public data (no budget)"
)

router = Router(prefix="/v1/datasets", tags=["datasets"])


class DatasetUpload(BaseModel):
    """Multipart form of an upload."""

    model_config = ConfigDict(extra="forbid")

    # ``format: binary`` (OpenAPI 3.0's file marker) next to 3.1's ``contentMediaType``:
    # openapi-python-client then types the field as a File and sends it as a file part.
    file: UploadFile = Field(
        description="CSV, Parquet or NPZ (arrays x, y, optional clients).",
        json_schema_extra={"format": "binary"},
    )
    name: str = Field(min_length=1, max_length=200)
    target: str | None = Field(default=None, max_length=200, description="Label column.")
    client_column: str | None = Field(default=None, max_length=200)
    epsilon: float | None = Field(default=None, gt=0, le=100)
    delta: float | None = Field(default=None, gt=0, lt=1)
    privacy_unit: Literal["record", "client"] = "record"
    # Aliased: a field named ``schema`` would shadow a BaseModel attribute.
    dataset_schema: str | None = Field(
        default=None,
        alias="schema",
        max_length=1_000_000,
        description='The declared schema, as JSON: {"classes": ["benign", "malignant"]}. '
        "Required with a budget (epsilon and delta): the released classes are the declared "
        "ones, and a row whose label is not declared is refused. Public data may omit it "
        "(the classes are then the distinct labels).",
    )
    validation_dataset_id: str | None = Field(
        default=None, max_length=64, description=VALIDATION_DATASET_DESCRIPTION
    )

    @model_validator(mode="after")
    def _no_nul(self) -> DatasetUpload:
        # PostgreSQL stores no NUL in text; the JSON guard does not scan multipart bodies.
        for name in ("name", "target", "client_column", "dataset_schema", "validation_dataset_id"):
            value = getattr(self, name, None)
            if isinstance(value, str) and "\x00" in value:
                field = "schema" if name == "dataset_schema" else name
                raise InvalidInput("NUL characters are not allowed in text", field=field)
        return self


def _problem(row: models.Dataset, *, owner: bool) -> DatasetProblem | None:
    # Why a budgeted upload is invalid (an undeclared label, too few rows for its δ) is
    # learnt from its protected rows: only the data's owner sees it (docs/privacy.md).
    if row.problem is None or (row.epsilon_total is not None and not owner):
        return None
    reason = dict(row.problem)
    code = reason.pop("code", "invalid-input")
    # Stored by ppml.services.ingestion from a domain error: no re-validation on reads.
    return DatasetProblem.model_construct(type=f"/problems/{code}", **reason)


def _shown_input_shape(row: models.Dataset, ready: bool) -> list[int] | None:
    # Declared (or an NPZ image array's shape): public metadata, like the feature count.
    shape = row.input_shape if ready else None
    return None if shape is None else list(shape)


def to_schema(row: models.Dataset, *, owner: bool = True) -> Dataset:
    """The dataset as a key of its tenant sees it (``owner``: an owner key)."""
    budget = None
    if row.epsilon_total is not None and row.delta_total is not None:
        budget = PrivacyBudget(epsilon=row.epsilon_total, delta=row.delta_total)
    ready = row.status == models.DatasetStatus.READY
    classes = service.declared_classes(row)
    return Dataset(
        id=row.id,
        name=row.name,
        status=row.status,
        problem=_problem(row, owner=owner),
        source=row.source,
        task=row.task,
        num_features=row.num_features if ready else None,
        num_classes=row.num_classes if ready else None,
        num_train=row.num_train if ready else None,
        num_test=row.num_test if ready else None,
        num_clients=row.num_clients if ready else None,
        num_test_clients=row.num_test_clients if ready else None,
        classes=classes,
        # Stored rows were validated when registered: no re-validation on reads.
        schema=DatasetSchema.model_construct(
            classes=classes,
            input_shape=_shown_input_shape(row, ready),
            bounds=declared_bounds(row.data_schema),  # public metadata the owner declared
        )
        if classes
        else None,
        privacy_budget=budget,
        privacy_unit=row.privacy_unit,
        validation_dataset_id=row.validation_dataset_id,
        created_at=row.created_at,
    )


def _location(response: Response, dataset_id: str) -> None:
    response.headers["Location"] = f"/v1/datasets/{dataset_id}"


@router.post(
    "",
    status_code=201,
    operation_id="create_dataset",
    responses=errors(403, 409),
    response_model=Dataset,
)
def create_dataset(
    body: DatasetCreate,
    tenant_id: CurrentTenant,
    principal: CurrentPrincipal,
    repos: ReposDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
) -> Dataset:
    """Register a built-in dataset (generated or loaded offline) with its privacy budget.

    A budget needs an owner key (403 for an analyst key); public data (no budget) does not.
    Every registration of a built-in holds the same rows, so a tenant registers each one with
    a budget once: a second time is 409 ``dataset-already-registered``, naming the first
    (deleted or not), whose budget binds those rows.
    """
    budget = body.privacy_budget
    if budget is not None:
        require_owner(principal, BUDGET_NEEDS_OWNER)
    row = service.register_builtin(
        repos,
        store,
        settings,
        tenant_id=tenant_id,
        name=body.name,
        builtin=body.source.builtin,
        budget=service.BudgetRequest(epsilon=budget.epsilon, delta=budget.delta)
        if budget
        else None,
        unit=body.privacy_unit,
        validation_dataset_id=body.validation_dataset_id,
        by=principal,
    )
    _location(response, row.id)
    return to_schema(row)


@router.post(
    "/upload",
    status_code=202,
    operation_id="upload_dataset",
    responses=errors(403, 409, 413),
    response_model=Dataset,
)
def upload_dataset(
    form: Annotated[DatasetUpload, Form(media_type="multipart/form-data")],
    tenant_id: CurrentTenant,
    principal: CurrentPrincipal,
    repos: ReposDep,
    store: StoreDep,
    settings: SettingsDep,
    jobs: JobServiceDep,
    response: Response,
    background: BackgroundTasks,
) -> Dataset:
    """Upload a CSV, Parquet or NPZ file. Omit epsilon and delta for public data.

    What can be checked before the file is stored is answered at once: a budget needs an
    owner key (403 for an analyst key); the file's size, format, declared columns and the
    size it would decode to (413, 422); the declared schema (422); the tenant's storage
    quota (409). The file is then stored and the answer is 202 with the dataset
    ``validating``: a worker decodes and checks it, and the dataset becomes ``ready`` or
    ``invalid`` (its ``problem`` says why, and nothing of the file is kept). Poll the
    ``Location``. Rows the tenant registered with a budget before (the same content
    fingerprint, the dataset deleted or not) make a budgeted upload ``invalid`` with
    ``dataset-already-registered``.
    """
    if form.epsilon is not None or form.delta is not None:
        require_owner(principal, BUDGET_NEEDS_OWNER)
    if (form.epsilon is None) != (form.delta is None):
        raise InvalidInput("give both epsilon and delta, or neither", field="delta")
    schema = None
    if form.dataset_schema is not None:
        schema = parse_schema(form.dataset_schema, max_classes=settings.limits.max_classes)
    limit = settings.limits.max_upload_bytes
    with store.staging(".upload") as staged:
        with staged.open("wb") as out:
            copied = 0
            while chunk := form.file.file.read(1 << 20):
                copied += len(chunk)
                if copied > limit:
                    raise PayloadTooLarge(f"uploads are limited to {limit} bytes", limit=limit)
                out.write(chunk)
        if copied == 0:
            raise InvalidInput("the file is empty", field="file")
        budget = None
        if form.epsilon is not None and form.delta is not None:
            budget = service.BudgetRequest(epsilon=form.epsilon, delta=form.delta)
        row = uploads.accept_upload(
            repos,
            store,
            settings,
            tenant_id=tenant_id,
            name=form.name,
            staged=staged,
            filename=form.file.filename or "",
            target=form.target,
            client_column=form.client_column,
            budget=budget,
            unit=form.privacy_unit,
            schema=schema,
            validation_dataset_id=form.validation_dataset_id,
            by=principal,
        )
    # Background tasks run after the response, so after the unit of work has committed.
    background.add_task(enqueue_ingestion, jobs.celery, row.id)
    _location(response, row.id)
    return to_schema(row)


@router.get("", operation_id="list_datasets", responses=errors(), response_model=DatasetPage)
def list_datasets(
    principal: CurrentPrincipal,
    repos: ReposDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> DatasetPage:
    """List the tenant's datasets, newest first."""
    rows, token = repos.list_datasets(
        principal.tenant_id, page_size=page_size, page_token=page_token
    )
    owner = principal.is_owner
    return DatasetPage(items=[to_schema(r, owner=owner) for r in rows], next_page_token=token)


@router.delete(
    "/{dataset_id}",
    status_code=204,
    operation_id="delete_dataset",
    responses=errors(403, 404, 409),
)
def delete_dataset(
    dataset_id: Annotated[str, Path(max_length=64)],
    principal: CurrentPrincipal,
    repos: ReposDep,
    store: StoreDep,
    jobs: JobServiceDep,
    delete_models: Annotated[
        bool,
        Query(
            description="Also delete the model files of the dataset's jobs: their downloads "
            "and predictions then answer 410 (receipts and digests stay on the jobs)."
        ),
    ] = False,
) -> Response:
    """Delete a dataset (owner keys): its data files and its jobs' checkpoints are erased.

    Its budget, ledger, jobs and audit trail are kept, and so is its content fingerprint:
    the same rows cannot be registered with a new budget, so deleting refunds no ε. The
    dataset is then no longer listed, and its routes answer 404 (``dataset-deleted``). 409
    while queued or running jobs use it (cancel them or wait), or while another dataset
    names it as its validation set. Deleting it again answers 204, and deletes the models
    when ``delete_models`` is asked then.
    """
    delete_dataset_files(
        repos,
        store,
        tenant_id=principal.tenant_id,
        dataset_id=dataset_id,
        delete_models=delete_models,
        by=principal,
    )
    jobs.forget_dataset(principal.tenant_id, dataset_id)
    return Response(status_code=204)


@router.get(
    "/{dataset_id}", operation_id="get_dataset", responses=errors(404), response_model=Dataset
)
def get_dataset(dataset: OwnedDataset, principal: CurrentPrincipal) -> Dataset:
    """One dataset's metadata."""
    return to_schema(dataset, owner=principal.is_owner)


@router.get(
    "/{dataset_id}/budget",
    operation_id="get_dataset_budget",
    responses=errors(404, 409),
    response_model=Budget,
)
def get_dataset_budget(dataset: OwnedDataset, repos: ReposDep) -> Budget:
    """Spent, reserved and remaining ε, composed across jobs by RDP (ready datasets)."""
    service.require_ready(dataset)
    budget = repos.budget(dataset.id)
    if budget is None:
        raise NotFound("this dataset is public and has no privacy budget")
    status = budget_status(budget)
    return Budget(
        dataset_id=dataset.id,
        epsilon_total=status.epsilon_total,
        delta_total=status.delta_total,
        epsilon_spent=status.epsilon_spent,
        epsilon_reserved=status.epsilon_reserved,
        epsilon_remaining=status.epsilon_remaining,
        epsilon_spent_composed=status.epsilon_spent_composed,
        admission_filter=status.admission_filter,
        filter_anchor_order=status.filter_anchor,
        privacy_unit=status.unit,
        grid_version=budget.grid_version,
    )


@router.get(
    "/{dataset_id}/ledger",
    operation_id="list_ledger_entries",
    responses=errors(404),
    response_model=LedgerPage,
)
def list_ledger_entries(
    dataset: OwnedDataset,
    repos: ReposDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> LedgerPage:
    """The dataset's append-only ledger, oldest first."""
    rows, token = repos.list_ledger(dataset.id, page_size=page_size, page_token=page_token)
    items = [LedgerEntry.model_validate(r, from_attributes=True) for r in rows]
    return LedgerPage(items=items, next_page_token=token)
