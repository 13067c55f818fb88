"""Datasets: register built-ins, upload files, read budgets and ledgers."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CurrentTenant, OwnedDataset, ReposDep, SettingsDep, StoreDep
from api.routes.common import PageToken, errors
from api.schemas import (
    Budget,
    Dataset,
    DatasetCreate,
    DatasetPage,
    LedgerEntry,
    LedgerPage,
    PrivacyBudget,
)
from ppml.db import models
from ppml.errors import InvalidInput, NotFound, PayloadTooLarge
from ppml.privacy.ledger import budget_status
from ppml.services import datasets as service

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


class DatasetUpload(BaseModel):
    """Multipart form of an upload."""

    model_config = ConfigDict(extra="forbid")

    file: UploadFile = Field(description="CSV, Parquet or NPZ (arrays x, y, optional clients).")
    name: str = Field(min_length=1, max_length=200)
    target: str | None = Field(default=None, max_length=200, description="Label column.")
    client_column: str | None = Field(default=None, max_length=200)
    epsilon: float | None = Field(default=None, gt=0, le=100)
    delta: float | None = Field(default=None, gt=0, lt=1)
    privacy_unit: Literal["record", "client"] = "record"


def to_schema(row: models.Dataset) -> Dataset:
    budget = None
    if row.epsilon_total is not None and row.delta_total is not None:
        budget = PrivacyBudget(epsilon=row.epsilon_total, delta=row.delta_total)
    return Dataset(
        id=row.id,
        name=row.name,
        source=row.source,
        task=row.task,
        num_features=row.num_features,
        num_classes=row.num_classes,
        num_train=row.num_train,
        num_test=row.num_test,
        num_clients=row.num_clients,
        classes=[str(c) for c in row.classes.get("labels", [])],
        privacy_budget=budget,
        privacy_unit=row.privacy_unit,
        created_at=row.created_at,
    )


def _location(response: Response, dataset_id: str) -> None:
    response.headers["Location"] = f"/v1/datasets/{dataset_id}"


@router.post(
    "", status_code=201, operation_id="create_dataset", responses=errors(), response_model=Dataset
)
def create_dataset(
    body: DatasetCreate,
    tenant_id: CurrentTenant,
    repos: ReposDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
) -> Dataset:
    """Register a built-in dataset (generated or loaded offline) with its privacy budget."""
    budget = body.privacy_budget
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
    )
    _location(response, row.id)
    return to_schema(row)


@router.post(
    "/upload",
    status_code=201,
    operation_id="upload_dataset",
    responses=errors(413),
    response_model=Dataset,
)
def upload_dataset(
    form: Annotated[DatasetUpload, Form(media_type="multipart/form-data")],
    tenant_id: CurrentTenant,
    repos: ReposDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
) -> Dataset:
    """Upload a CSV, Parquet or NPZ file. Omit epsilon and delta for public data."""
    if (form.epsilon is None) != (form.delta is None):
        raise InvalidInput("give both epsilon and delta, or neither", field="delta")
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
        row = service.register_upload(
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
        )
    _location(response, row.id)
    return to_schema(row)


@router.get("", operation_id="list_datasets", responses=errors(), response_model=DatasetPage)
def list_datasets(
    tenant_id: CurrentTenant,
    repos: ReposDep,
    page_size: Annotated[int, Query(ge=1, le=200)] = 50,
    page_token: PageToken = None,
) -> DatasetPage:
    """List the tenant's datasets, newest first."""
    rows, token = repos.list_datasets(tenant_id, page_size=page_size, page_token=page_token)
    return DatasetPage(items=[to_schema(r) for r in rows], next_page_token=token)


@router.get(
    "/{dataset_id}", operation_id="get_dataset", responses=errors(404), response_model=Dataset
)
def get_dataset(dataset: OwnedDataset) -> Dataset:
    """One dataset's metadata."""
    return to_schema(dataset)


@router.get(
    "/{dataset_id}/budget",
    operation_id="get_dataset_budget",
    responses=errors(404),
    response_model=Budget,
)
def get_dataset_budget(dataset: OwnedDataset, repos: ReposDep) -> Budget:
    """Spent, reserved and remaining ε, composed across jobs by RDP."""
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
    page_size: Annotated[int, Query(ge=1, le=200)] = 50,
    page_token: PageToken = None,
) -> LedgerPage:
    """The dataset's append-only ledger, oldest first."""
    rows, token = repos.list_ledger(dataset.id, page_size=page_size, page_token=page_token)
    items = [LedgerEntry.model_validate(r, from_attributes=True) for r in rows]
    return LedgerPage(items=items, next_page_token=token)
