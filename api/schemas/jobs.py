"""Jobs, their exact metrics and quotes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from ppml.jobs.records import JobError, PrivacyRecord, Progress
from ppml.privacy.evaluation import ExactScores, Metrics
from ppml.specs import JobSpec


class ExactMetrics(BaseModel):
    """Exact held-out figures of a job: for the dataset's owner only."""

    job_id: str
    metrics: ExactScores | None
    history: list[ExactScores] | None


class Job(BaseModel):
    id: str
    name: str
    dataset_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    spec: JobSpec
    progress: Progress
    metrics: Metrics | None = Field(
        description="Held-out metrics with the mechanism that released them; null until the "
        "job ends, or when an evaluation share of 0 withholds them from analysts. Owners read "
        "the exact figures at /v1/jobs/{id}/metrics/exact."
    )
    metrics_history: list[Metrics] | None = Field(
        default=None, description="Released metrics per scored round (federated jobs)."
    )
    privacy: PrivacyRecord | None = Field(
        description="The job's mechanism: its plan at admission, its outcome at the end."
    )
    error: JobError | None
    cancel_requested: bool
    attempts: int = Field(
        default=0,
        description="Times a worker claimed the job. A job whose worker was lost goes back to "
        "the queue and resumes from its last checkpoint, up to the server's limit of attempts.",
    )
    compute: int | None = Field(
        default=None,
        description="Estimated work, in sample-gradients × model parameters (expected "
        "per-example gradients of the whole job times its parameters), counted against the "
        "server's per-job and per-tenant limits; null for jobs admitted before estimates.",
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    models_deleted_at: datetime | None = Field(
        default=None,
        description="When the model files were deleted with the job's dataset; downloads and "
        "predictions then answer 410.",
    )


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
    compute: int = Field(
        description="Estimated work, in sample-gradients × model parameters: what the job "
        "counts against the server's per-job and per-tenant compute limits."
    )
