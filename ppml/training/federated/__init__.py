"""Federated learning simulation: partitioners, strategies (FedAvg, FedProx, FedAdam,
DP-FedAvg as a wrapper), vectorised client training and the round loop.

``partition`` is pure numpy; everything else imports torch, so, as for the rest of
``ppml.training``, only the worker imports this package.
"""

from ppml.training.federated.aggregate import (
    PartialSum,
    adam_server_step,
    add_gaussian_noise,
    add_weighted,
    apply_delta,
    clip_rows,
    weighted_mean,
)
from ppml.training.federated.partition import PARTITIONERS, column, dirichlet, iid, partition
from ppml.training.federated.simulation import (
    VECTORIZABLE,
    FederatedDP,
    FederatedPlan,
    FederatedResult,
    RoundProgress,
    train_federated,
)
from ppml.training.federated.strategies import (
    STRATEGIES,
    ClientConfig,
    DPFedAvgClientLevel,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
    build_strategy,
)

__all__ = [
    "PARTITIONERS",
    "STRATEGIES",
    "VECTORIZABLE",
    "ClientConfig",
    "DPFedAvgClientLevel",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FederatedDP",
    "FederatedPlan",
    "FederatedResult",
    "PartialSum",
    "RoundProgress",
    "Strategy",
    "adam_server_step",
    "add_gaussian_noise",
    "add_weighted",
    "apply_delta",
    "build_strategy",
    "clip_rows",
    "column",
    "dirichlet",
    "iid",
    "partition",
    "train_federated",
    "weighted_mean",
]
