"""Job specifications: what a user asks for, validated before anything is stored.

Pure pydantic (no torch): the API validates and prices jobs with these, the worker reads the
stored spec back with the same models.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "EvaluationSpec",
    "FederatedSpec",
    "JobSpec",
    "ModelSpec",
    "PartitionSpec",
    "PrivacySpec",
    "TrainingSpec",
    "request_hash",
]

PositiveSize = Annotated[int, Field(strict=True, ge=1, le=4096)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Spec):
    """Architecture of the model to train."""

    # One entry per name in ppml.architectures (count, validation); a test keeps them equal.
    arch: Literal["logreg", "mlp", "cnn1d"] = Field(description="Model architecture.")
    hidden_sizes: list[PositiveSize] = Field(
        default=[128], max_length=8, description="Widths of the hidden layers (mlp)."
    )
    channels: list[PositiveSize] = Field(
        default=[16, 32], min_length=1, max_length=6, description="Conv channels (cnn1d)."
    )
    kernel_size: int = Field(
        strict=True, default=5, ge=1, le=31, description="Conv kernel size (cnn1d)."
    )


class TrainingSpec(_Spec):
    """Optimisation settings."""

    epochs: int = Field(
        strict=True, ge=1, le=10_000, description="Passes over the training records."
    )
    batch_size: int = Field(strict=True, ge=1, le=65_536, description="Expected batch size.")
    learning_rate: float = Field(
        strict=True, ge=1e-8, le=100, description="Optimiser learning rate."
    )
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(strict=True, default=0.0, ge=0, lt=1, description="SGD momentum.")
    seed: int = Field(strict=True, default=0, ge=0, le=2**31 - 1)
    max_runtime_s: int | None = Field(
        strict=True,
        default=None,
        ge=1,
        description="Stop the job after this many seconds (capped).",
    )


class EvaluationSpec(_Spec):
    """How the held-out metrics analysts see are released (PRIVACY.md: held-out rows are
    protected rows). Owners always see the exact figures."""

    epsilon_share: float = Field(
        strict=True,
        default=0.03,
        ge=0,
        le=0.5,
        description="Fraction of target_epsilon spent on a Gaussian release of the held-out "
        "metrics (correct predictions and clipped loss, summed per privacy unit). 0 shows "
        "analysts no metrics. Ignored on public data and when the dataset has a public "
        "validation set (exact and free there).",
    )
    loss_clip: float = Field(
        strict=True,
        default=4.0,
        gt=0,
        le=100,
        description="Per-example cross-entropy is clipped to this bound before it is summed.",
    )


class PrivacySpec(_Spec):
    """Differential privacy of the job. σ is calibrated so the job spends ``target_epsilon``."""

    target_epsilon: float = Field(strict=True, ge=1e-3, le=100, description="ε this job may spend.")
    delta: float | None = Field(
        strict=True,
        default=None,
        gt=0,
        lt=1,
        description="δ of the job; defaults to the dataset's δ.",
    )
    max_grad_norm: float = Field(
        strict=True, default=1.0, ge=1e-6, le=1e4, description="Clipping norm C."
    )
    level: Literal["sample", "client"] = Field(
        default="sample", description="Privacy unit: one record, or one federated client."
    )
    sampling: Literal["poisson", "shuffle"] = Field(
        default="poisson",
        description="Batch sampling. Only Poisson sampling matches the accountant; "
        "shuffling is refused.",
    )
    evaluation: EvaluationSpec = EvaluationSpec()


class PartitionSpec(_Spec):
    scheme: Literal["iid", "dirichlet", "column"] = "iid"
    alpha: float = Field(
        strict=True, default=0.5, ge=1e-4, le=1e4, description="Dirichlet concentration."
    )


class FederatedSpec(_Spec):
    """Federated simulation over clients carved out of the dataset."""

    num_clients: int = Field(strict=True, ge=1, le=100_000)
    clients_per_round: int = Field(strict=True, ge=1, le=100_000)
    rounds: int = Field(strict=True, ge=1, le=100_000)
    local_epochs: int = Field(strict=True, default=1, ge=1, le=1_000)
    partition: PartitionSpec = PartitionSpec()
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    mu: float = Field(strict=True, default=0.01, ge=0, description="FedProx proximal weight.")
    server_learning_rate: float = Field(
        strict=True,
        default=1.0,
        gt=0,
        description="Server step size: 1.0 applies the averaged update (FedAvg, FedProx); "
        "FedAdam wants about 0.01-0.1.",
    )
    dropout: float = Field(
        strict=True, default=0.0, ge=0, lt=1, description="Fraction of clients lost."
    )
    evaluate_every: int | None = Field(
        strict=True,
        default=None,
        ge=1,
        le=100_000,
        description="Score the global model every this many rounds (and after the last); "
        "each score is a release (charged on budgeted data). Default: at most 20 scores. "
        "At most 50 scores per job.",
    )

    @model_validator(mode="after")
    def _clients_per_round(self) -> FederatedSpec:
        if self.clients_per_round > self.num_clients:
            raise ValueError("clients_per_round must not exceed num_clients")
        return self


class JobSpec(_Spec):
    """A training job on one dataset."""

    name: str = Field(min_length=1, max_length=200)
    dataset_id: str = Field(min_length=1, max_length=40)
    model: ModelSpec
    training: TrainingSpec
    privacy: PrivacySpec | None = Field(
        description="null trains without privacy (only on datasets without a budget)."
    )
    federated: FederatedSpec | None = None


def request_hash(spec: JobSpec) -> str:
    """Canonical hash of a job request, for ``Idempotency-Key`` comparisons."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
