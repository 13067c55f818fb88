"""The federated part of a job spec: simulated clients carved out of a dataset, or the
remote nodes of a federation (``federation_id``; docs/federation.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ppml.specs.base import Spec

__all__ = ["FederatedSpec", "PartitionSpec"]


class PartitionSpec(Spec):
    scheme: Literal["iid", "dirichlet", "column"] = "iid"
    alpha: float = Field(
        strict=True, default=0.5, ge=1e-4, le=1e4, description="Dirichlet concentration."
    )


class FederatedSpec(Spec):
    """Federated training: simulated clients carved out of the dataset, or the remote nodes
    of a federation (``federation_id``)."""

    federation_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=40,
        description="Train on the active nodes of this federation (POST /v1/federations) "
        "instead of simulated clients: the job then names no dataset_id, and takes no "
        "num_clients, partition or dropout.",
    )
    num_clients: int = Field(
        strict=True,
        default=0,
        ge=0,
        le=100_000,
        description="Simulated clients (required without federation_id). With a federation, "
        "set by ppml: its active nodes at admission.",
    )
    clients_per_round: int = Field(
        strict=True,
        default=0,
        ge=0,
        le=100_000,
        description="Clients (nodes) per round (required without federation_id). With a "
        "federation, 0 or absent means every active node.",
    )
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
    round_timeout_s: int = Field(
        strict=True,
        default=120,
        ge=5,
        le=86_400,
        description="Federation jobs: how long a round waits for the nodes' updates.",
    )
    quorum: int = Field(
        strict=True,
        default=1,
        ge=1,
        le=100_000,
        description="Federation jobs: accepted updates a round needs (else it is repeated, "
        "at most 3 times).",
    )

    @model_validator(mode="after")
    def _clients_per_round(self) -> FederatedSpec:
        if self.federation_id is None:
            if self.num_clients < 1:
                raise ValueError("num_clients is required (at least 1) without federation_id")
            if self.clients_per_round < 1:
                raise ValueError("clients_per_round is required (at least 1)")
        if self.clients_per_round > self.num_clients and self.num_clients:
            raise ValueError("clients_per_round must not exceed num_clients")
        return self
