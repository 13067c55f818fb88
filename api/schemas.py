"""Request and response bodies of the HTTP contract (``shared/API.md``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ppml.specs import JobSpec

__all__ = [
    "ApiKeyCreated",
    "Budget",
    "Dataset",
    "DatasetCreate",
    "DatasetPage",
    "Job",
    "JobPage",
    "JobSpec",
    "LedgerEntry",
    "LedgerPage",
    "ModelCard",
    "PrivacyBudget",
    "Problem",
    "Quote",
    "Tenant",
    "TenantCreate",
    "TenantPage",
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """An RFC 9457 problem document; extension members vary by ``type``."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["/problems/budget-exceeded"])
    title: str
    status: int
    detail: str


class TenantCreate(_In):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Tenant(BaseModel):
    id: str
    name: str
    created_at: datetime


class TenantPage(BaseModel):
    items: list[Tenant]
    next_page_token: str | None


class ApiKeyCreated(BaseModel):
    id: str
    tenant_id: str
    key: str = Field(description="The secret key. It is shown only once.")
    created_at: datetime


class PrivacyBudget(_In):
    epsilon: float = Field(gt=0, le=100, description="Total ε allotted to the dataset.")
    delta: float = Field(gt=0, lt=1, description="Total δ; must be well below 1/n.")


class BuiltinSource(_In):
    builtin: Literal["digits", "breast_cancer", "mnist1d"]


class DatasetCreate(_In):
    name: str = Field(min_length=1, max_length=200)
    source: BuiltinSource
    privacy_budget: PrivacyBudget | None = Field(
        description="The dataset's budget; null marks public data (no privacy needed). "
        "Required, so that forgetting it never makes private data public."
    )
    privacy_unit: Literal["record", "client"] = "record"


class Dataset(BaseModel):
    id: str
    name: str
    source: dict[str, Any]
    task: str
    num_features: int
    num_classes: int
    num_train: int
    num_test: int
    num_clients: int | None
    classes: list[str]
    privacy_budget: PrivacyBudget | None
    privacy_unit: Literal["record", "client"]
    created_at: datetime


class DatasetPage(BaseModel):
    items: list[Dataset]
    next_page_token: str | None


class Budget(BaseModel):
    dataset_id: str
    epsilon_total: float
    delta_total: float
    epsilon_spent: float = Field(description="ε of the committed charges, composed by RDP.")
    epsilon_reserved: float = Field(description="Extra ε held by queued and running jobs.")
    epsilon_remaining: float = Field(description="ε the admission filter can still grant.")
    accounting: Literal["rdp"] = "rdp"
    admission: Literal["rdp-filter"] = "rdp-filter"
    privacy_unit: str
    grid_version: str


class LedgerEntry(BaseModel):
    id: str
    job_id: str
    kind: Literal["reserve", "commit", "release"]
    epsilon: float = Field(description="ε of this entry alone, at the dataset's δ.")
    event: dict[str, Any] = Field(description="The mechanism event that was priced.")
    rdp: dict[str, Any] = Field(description="The entry's RDP curve in integer units.")
    note: str | None
    created_at: datetime


class LedgerPage(BaseModel):
    items: list[LedgerEntry]
    next_page_token: str | None


class Progress(BaseModel):
    fraction: float
    epoch: int
    round: int | None
    steps: int


class Job(BaseModel):
    id: str
    name: str
    dataset_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    spec: dict[str, Any]
    progress: Progress
    metrics: dict[str, float] | None
    privacy: dict[str, Any] | None
    error: dict[str, Any] | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobPage(BaseModel):
    items: list[Job]
    next_page_token: str | None


class Quote(BaseModel):
    epsilon: float
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int
    fits_budget: bool
    epsilon_remaining: float | None
    max_target_epsilon: float | None = Field(
        description="When it does not fit: the largest target_epsilon of this shape that would."
    )


class ModelCard(BaseModel):
    job_id: str
    dataset_id: str
    receipt: dict[str, str] = Field(description="The privacy receipt, as in the file metadata.")
    metrics: dict[str, float] | None
    artifacts: dict[str, dict[str, str]] = Field(description="sha256 of each artefact format.")
