"""A task as the server hands it out (``POST /v1/node/poll``), validated before it is used.

The node trusts no privacy figure from the server: a sample-level task gives the mechanism
(q, σ, C, steps per round, rounds, δ) and the node prices it with ppml's accountant itself.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ppml.privacy import accounting as acc
from ppml.specs import ModelSpec

__all__ = ["ClientPrivacy", "SamplePrivacy", "Task", "TaskTraining"]


class _Wire(BaseModel):
    # The server may add fields; the node reads what it knows.
    model_config = ConfigDict(extra="ignore", frozen=True)


class TaskTraining(_Wire):
    local_epochs: int = Field(ge=1, le=10_000)
    batch_size: int = Field(ge=1, le=65_536)
    learning_rate: float = Field(gt=0, le=100)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    proximal_mu: float = Field(default=0.0, ge=0)


class SamplePrivacy(_Wire):
    sample_rate: float = Field(gt=0, le=1)
    noise_multiplier: float = Field(gt=0)
    max_grad_norm: float = Field(gt=0)
    steps: int = Field(ge=1, le=10_000_000)
    delta: float = Field(gt=0, lt=1)
    rounds: int = Field(ge=1)

    def round_event(self) -> acc.MechanismEvent:
        """One round's mechanism: ``steps`` Poisson-sampled Gaussian steps on one record."""
        return acc.MechanismEvent(
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            steps=self.steps,
            unit="record",
        )


class ClientPrivacy(_Wire):
    clip_norm: float = Field(gt=0)


class Task(_Wire):
    """One round of one job for this node."""

    id: str = Field(min_length=1, max_length=64)
    job_id: str = Field(min_length=1, max_length=64)
    round: int = Field(ge=0)
    rounds: int = Field(ge=1)
    deadline: str | None = None
    mode: Literal["sample", "client", "none"]
    model: ModelSpec
    num_features: int = Field(ge=1)
    num_classes: int = Field(ge=2)
    input_shape: list[int] | None = None
    training: TaskTraining
    privacy: dict[str, Any] | None = None
    weights_sha256: str | None = None

    @model_validator(mode="after")
    def _privacy_fits_mode(self) -> Task:
        if self.mode == "sample":
            SamplePrivacy.model_validate(self.privacy or {})
        elif self.mode == "client":
            ClientPrivacy.model_validate(self.privacy or {})
        return self

    @property
    def sample(self) -> SamplePrivacy:
        return SamplePrivacy.model_validate(self.privacy or {})

    @property
    def client(self) -> ClientPrivacy:
        return ClientPrivacy.model_validate(self.privacy or {})
