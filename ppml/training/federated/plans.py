"""The public inputs and outputs of ``train_federated`` (keyword-only dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppml.training.dp_sgd import Progress
from ppml.training.federated.partition import PARTITIONERS
from ppml.training.federated.strategies import STRATEGIES

__all__ = [
    "PRIVACY_LEVELS",
    "FederatedDP",
    "FederatedPlan",
    "FederatedResult",
    "RoundProgress",
]

PRIVACY_LEVELS = ("client", "sample")


@dataclass(frozen=True, kw_only=True)
class FederatedPlan:
    """The federated part of a job (mirrors ``ppml.specs.FederatedSpec``).

    Attributes:
        num_clients: Number of clients the training rows are split into.
        clients_per_round: Clients per round (the expected number under client-level DP).
        rounds: Number of rounds.
        local_epochs: Local passes over its shard per participating client and round.
        partition: ``"iid"``, ``"dirichlet"`` or ``"column"``.
        alpha: Dirichlet concentration.
        strategy: ``"fedavg"``, ``"fedprox"`` or ``"fedadam"``.
        mu: FedProx proximal weight.
        server_learning_rate: Server step size.
        dropout: Probability that a sampled client fails and its update is lost.
        vectorized: Train clients together (stacked parameters); None: whenever the
            architecture allows.
        chunk_size: Clients trained together by the vectorised path; None: 100, or on
            CPU for logreg/mlp as many as keep their weights within 8 MiB (cache).
        eval_every: Score the global model every this many rounds (and after the last).
    """

    num_clients: int
    clients_per_round: int
    rounds: int
    local_epochs: int
    partition: str
    alpha: float
    strategy: str
    mu: float
    server_learning_rate: float
    dropout: float
    vectorized: bool | None = None
    chunk_size: int | None = None
    eval_every: int = 1

    def __post_init__(self) -> None:
        counts = (self.num_clients, self.clients_per_round, self.rounds, self.local_epochs)
        chunk = 1 if self.chunk_size is None else self.chunk_size
        if min(*counts, chunk, self.eval_every) < 1:
            raise ValueError("client counts, rounds, epochs, chunk_size, eval_every must be >= 1")
        if self.clients_per_round > self.num_clients:
            raise ValueError("clients_per_round must not exceed num_clients")
        if self.partition not in PARTITIONERS:
            raise ValueError(f"unknown partition scheme {self.partition!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}")
        if not 0 <= self.dropout < 1 or not self.mu >= 0 or not self.server_learning_rate > 0:
            raise ValueError("need dropout in [0, 1), mu >= 0 and server_learning_rate > 0")


@dataclass(frozen=True, kw_only=True)
class FederatedDP:
    """The admitted DP mechanism of a federated job; used exactly as given.

    Attributes:
        level: ``"client"`` (DP-FedAvg) or ``"sample"`` (DP-SGD on every client).
        noise_multiplier: σ.
        clip_norm: C: of a client's update (client level) or of a sample's gradient.
        sample_rate: Client level: ``clients_per_round / num_clients``; sample level:
            the Poisson rate ``q`` every client uses on its shard.
        delta: The job's δ (the ledger, not the training, accounts the job).
    """

    level: str
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    delta: float | None = None

    def __post_init__(self) -> None:
        if self.level not in PRIVACY_LEVELS:
            raise ValueError(f"unknown privacy level {self.level!r}")
        if not self.noise_multiplier > 0 or not self.clip_norm > 0:
            raise ValueError("noise_multiplier and clip_norm must be > 0")
        if not 0 < self.sample_rate <= 1:
            raise ValueError("sample_rate must be in (0, 1]")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class RoundProgress(Progress):
    """Progress of a federated job.

    Attributes:
        steps_done: In the unit of the DP mechanism: rounds (client level, non-private),
            or local DP-SGD steps per client ``rounds × local_epochs × ceil(1/q)``.
        epoch: Local epochs run by a client that took part in every round.
        fraction: ``rounds_done / rounds``.
        round: Rounds completed.
    """

    round: int


@dataclass(frozen=True, kw_only=True)
class FederatedResult:
    """The outcome of ``train_federated``.

    Attributes:
        state_dict: Weights of the global model, contiguous, on CPU.
        steps_done: As in ``RoundProgress`` (what the ledger charges).
        rounds_done: Rounds completed.
        stopped: Whether ``should_stop`` ended training early.
        metrics: Final ``test_accuracy`` and ``test_loss`` of the global model.
        history: Per evaluated round ``round``, ``test_accuracy``, ``test_loss`` and
            (not under client-level DP) ``clients``, the clients aggregated.
        device: The device trained on.
    """

    state_dict: dict[str, torch.Tensor]
    steps_done: int
    rounds_done: int
    stopped: bool
    metrics: dict[str, float]
    history: list[dict[str, float]]
    device: str
