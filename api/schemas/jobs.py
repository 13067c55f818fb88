"""Jobs, their exact metrics and quotes."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

from ppml.jobs.records import JobError, PrivacyRecord, Progress
from ppml.privacy.evaluation import ExactScores, Metrics
from ppml.specs import JobSpec, ModelSpec, TrainingSpec


class JobStatusFilter(StrEnum):
    """A job status to filter lists by (a named schema, so generated clients name it)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ExactMetrics(BaseModel):
    """Exact held-out figures of a job: for the dataset's owner only."""

    job_id: str = Field(description="The job.")
    metrics: ExactScores | None = Field(description="The final model's exact figures.")
    history: list[ExactScores] | None = Field(description="Per scored round (federated).")


class Job(BaseModel):
    """A training job: its spec, where it stands, and what it released."""

    id: str = Field(description="The job's id (opaque).")
    name: str = Field(description="The name the spec gave it.")
    dataset_id: str = Field(description="The dataset it trains on (and is charged to).")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="Where the job stands; succeeded, failed and cancelled are final."
    )
    spec: JobSpec = Field(
        description="The spec as admitted: as submitted, with the model and training ppml "
        "chose where it left them out (listed in spec.defaults_applied; docs/defaults.md)."
    )
    progress: Progress = Field(description="How far it came, as its worker last reported.")
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
    error: JobError | None = Field(description="Why the job failed; null otherwise.")
    cancel_requested: bool = Field(description="A cancel was asked for (running jobs stop soon).")
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
    created_at: datetime = Field(description="When it was submitted.")
    started_at: datetime | None = Field(description="When a worker first claimed it.")
    finished_at: datetime | None = Field(description="When it reached its final status.")
    models_deleted_at: datetime | None = Field(
        default=None,
        description="When the model files were deleted with the job's dataset; downloads and "
        "predictions then answer 410.",
    )
    webhook_secret: str | None = Field(
        default=None,
        description="The secret that signs this job's webhook (HMAC-SHA256, docs/api.md, "
        "'Webhooks'): only in the answer to POST /v1/jobs (and its idempotent replays) of a "
        "job that names a webhook_url; null everywhere else.",
    )


class MetricsPoint(BaseModel):
    """One report of a job's training, as its event sequence recorded it: how far it came and
    the ε its steps had spent. Functions of the job's spec and of the worker, never of the
    data (docs/privacy.md)."""

    seq: int = Field(description="The report's id in the job's event stream (`id:` there).")
    at: datetime = Field(description="When the worker reported.")
    steps: int = Field(description="Noisy steps (federated: the rounds' steps) run so far.")
    epoch: int = Field(description="Completed epochs (federated: rounds × local epochs).")
    round: int | None = Field(description="Completed federated rounds; null if centralised.")
    fraction: float = Field(description="Share of the planned steps run, 0 to 1.")
    epsilon_spent: float | None = Field(
        description="ε of the steps so far at the job's δ (private jobs); the last report of "
        "an ended job includes its evaluation releases."
    )
    eta_seconds: float | None = Field(
        description="Estimated seconds left, from the pace since the job started; null when "
        "it cannot be told (not started, nothing run yet, or ended)."
    )


class MetricsHistory(BaseModel):
    """A job's metrics as a history: its reports (live), then its held-out metrics.

    ``released`` holds what every key of the tenant may see: the held-out metrics as their
    mechanism released them (Gaussian on budgeted data), one per scored federated round or
    the final scores of a centralised job, once the job has ended. ``exact`` holds the exact
    figures and is filled for the dataset's owner keys only (null for analysts). Training loss
    on private batches is never computed for release.
    """

    job_id: str = Field(description="The job.")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="The job's status when read."
    )
    points: list[MetricsPoint] = Field(description="Reports after `after`, oldest first.")
    next_after: int | None = Field(
        description="More reports follow: pass this as `after` to read them; null at the end."
    )
    released: list[Metrics] | None = Field(
        description="Released held-out metrics per scoring (null until the job has ended, or "
        "when they are withheld from analysts)."
    )
    exact: list[ExactScores] | None = Field(
        description="Exact held-out figures per scoring: owner keys only, null for analysts."
    )


class JobPage(BaseModel):
    """A page of jobs, newest first."""

    items: list[Job] = Field(description="The jobs of this page.")
    next_page_token: str | None = Field(description="Pass as page_token for the next page.")


class Quote(BaseModel):
    """What a job would cost, priced as admission would price it; nothing is reserved."""

    epsilon: float = Field(description="ε the job would be charged (training and metrics).")
    delta: float | None = Field(description="Its δ; null for a non-private job.")
    noise_multiplier: float | None = Field(description="σ calibrated for the target.")
    sample_rate: float | None = Field(description="Poisson sampling rate q.")
    steps: int = Field(description="Noisy steps (or rounds) it would run.")
    fits_budget: bool = Field(description="Whether the dataset's budget admits it now.")
    epsilon_remaining: float | None = Field(
        description="ε the dataset's admission filter can still grant; null without a budget."
    )
    max_target_epsilon: float | None = Field(
        description="The largest target_epsilon of this shape that the dataset's budget would "
        "admit now (whether or not this one fits); null without a budget, or when none would."
    )
    compute: int = Field(
        description="Estimated work, in sample-gradients × model parameters: what the job "
        "counts against the server's per-job and per-tenant compute limits."
    )
    model: ModelSpec = Field(
        description="The model priced: the spec's, or the one ppml chose (docs/defaults.md)."
    )
    training: TrainingSpec = Field(
        description="The training priced: the spec's, or the one ppml chose."
    )
    defaults_applied: list[Literal["model", "training"]] = Field(
        description="The fields ppml chose because the spec left them out."
    )
