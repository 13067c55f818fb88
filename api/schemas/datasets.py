"""Datasets, budgets and ledger entries."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas.common import _In
from ppml.datasets.schema import DatasetSchema


class PrivacyBudget(_In):
    epsilon: float = Field(
        strict=True, gt=0, le=100, description="Total ε allotted to the dataset."
    )
    delta: float = Field(strict=True, gt=0, lt=1, description="Total δ; must be well below 1/n.")


class BuiltinSource(_In):
    builtin: Literal["digits", "breast_cancer", "mnist1d"]


VALIDATION_DATASET_DESCRIPTION = (
    "A public dataset of this tenant (no budget, same number of features, same declared "
    "classes) on which jobs are scored exactly."
)


class DatasetCreate(_In):
    name: str = Field(min_length=1, max_length=200)
    source: BuiltinSource
    privacy_budget: PrivacyBudget | None = Field(
        description="The dataset's budget; null marks public data (no privacy needed). "
        "Required, so that forgetting it never makes private data public."
    )
    privacy_unit: Literal["record", "client"] = "record"
    validation_dataset_id: str | None = Field(
        default=None, max_length=64, description=VALIDATION_DATASET_DESCRIPTION
    )


class DatasetProblem(BaseModel):
    """Why an upload is invalid: a problem document (RFC 9457) without a status, naming the
    problem and the field, never a value from the data."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    detail: str
    field: str | None = None


class Dataset(BaseModel):
    """A registered dataset. Its counts are released metadata (PRIVACY.md): each unit's
    train/test side is a keyed hash of that unit alone, so they vary around the split's
    fraction; its classes are the declared ones, never read from the private data.

    An upload is ``validating`` until a worker has decoded and checked it (its counts are
    null until then), then ``ready`` (it takes jobs) or ``invalid`` (``problem`` says why;
    nothing of the file is kept)."""

    id: str
    name: str
    status: Literal["validating", "ready", "invalid"] = Field(
        description="validating (an upload being checked), ready, or invalid (see problem)."
    )
    problem: DatasetProblem | None = Field(
        default=None, description="Why the upload is invalid (invalid datasets only)."
    )
    source: dict[str, Any]
    task: str
    num_features: int | None = Field(description="Feature columns; null until ready.")
    num_classes: int | None = Field(
        description="Declared classes (released metadata); null until ready."
    )
    num_train: int | None = Field(
        description="Training rows (released metadata); null until ready."
    )
    num_test: int | None = Field(
        description="Held-out test rows (released metadata); null until ready."
    )
    num_clients: int | None = Field(
        description="Natural clients (distinct client ids) with training rows; null without "
        "a client column (released metadata)."
    )
    num_test_clients: int | None = Field(
        description="Natural clients wholly held out for testing (client privacy unit); "
        "null otherwise (released metadata).",
    )
    classes: list[str] = Field(
        description="The declared classes, as in schema.classes (empty until a public "
        "upload without a schema is ready)."
    )
    data_schema: DatasetSchema | None = Field(
        alias="schema",
        description="The declared schema: its classes are the released label set; null "
        "until a public upload without a schema is ready.",
    )
    privacy_budget: PrivacyBudget | None
    privacy_unit: Literal["record", "client"]
    validation_dataset_id: str | None = Field(
        default=None, description=VALIDATION_DATASET_DESCRIPTION
    )
    created_at: datetime


class DatasetPage(BaseModel):
    items: list[Dataset]
    next_page_token: str | None


class Budget(BaseModel):
    dataset_id: str
    epsilon_total: float
    delta_total: float
    epsilon_spent: float = Field(
        description="ε of the committed charges, composed by RDP, as the dataset's admission "
        "filter counts it (at the share of δ each order gets): spent + reserved + remaining "
        "= total."
    )
    epsilon_reserved: float = Field(
        description="Extra ε held by queued and running jobs, in the same unit."
    )
    epsilon_remaining: float = Field(
        description="ε the admission filter can still grant, in the same unit."
    )
    epsilon_spent_composed: float = Field(
        default=0.0,
        description="ε of the committed charges by the tightest conversion (the full δ at "
        "the best order): what job receipts add up to; at most epsilon_spent, and not "
        "additive with the figures above.",
    )
    accounting: Literal["rdp"] = "rdp"
    admission: Literal["rdp-filter"] = "rdp-filter"
    admission_filter: Literal["uniform-v1", "anchored-v1"] = Field(
        default="uniform-v1",
        description="How the filter splits δ over the RDP orders (docs/privacy.md): "
        "uniform-v1 evenly (budgets charged before filters were versioned), anchored-v1 "
        "mostly at the budget's anchor order and its neighbours.",
    )
    filter_anchor_order: float | None = Field(
        default=None, description="The anchor order of an anchored-v1 filter; else null."
    )
    privacy_unit: str
    grid_version: str


class LedgerEntry(BaseModel):
    id: str
    job_id: str | None = Field(
        description="The job charged; null for a dataset-level charge (its standardisation "
        "statistics, POST /v1/datasets/{id}/statistics)."
    )
    kind: Literal["reserve", "commit", "release"]
    epsilon: float = Field(description="ε of this entry alone, at the dataset's δ.")
    event: dict[str, Any] = Field(description="The mechanism event that was priced.")
    rdp: dict[str, Any] = Field(description="The entry's RDP curve in integer units.")
    note: str | None
    created_at: datetime
    seq: int = Field(description="The entry's place in the dataset's hash chain: 1, 2, ...")
    prev_hash: str = Field(
        description="entry_hash of the entry before it in the chain (64 zeros for the first)."
    )
    entry_hash: str = Field(
        description="SHA-256 (hex) of the entry's content and prev_hash (docs/privacy.md, "
        "'The ledger is a hash chain')."
    )


class LedgerPage(BaseModel):
    items: list[LedgerEntry]
    next_page_token: str | None
