"""Small federated problems the federated tests share: data, plans, DP settings and a fit."""

from __future__ import annotations

from typing import Any

import numpy as np

from ppml.datasets import record_keys
from ppml.specs import ModelSpec
from ppml.training.dp_sgd import TrainingPlan
from ppml.training.federated import FederatedDP, FederatedPlan, FederatedResult, train_federated

NUM_CLASSES = 3
SPLIT_SECRET = "5e" * 32


def keys_for(arrays: dict[str, np.ndarray], domain: str = "dirichlet:0") -> np.ndarray:
    """Per-row partition keys, as the worker computes them from the dataset's secret."""
    return record_keys(SPLIT_SECRET, domain, arrays["x_train"], arrays["y_train"].astype(str))


def make_data(n: int = 240, d: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 60, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, NUM_CLASSES))).argmax(axis=1).astype(np.int64)
    return {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:]}


MODEL: dict[str, Any] = {"arch": "mlp", "hidden_sizes": [16], "channels": [4, 4], "kernel_size": 3}


def make_plan(**overrides: Any) -> TrainingPlan:
    """A small plan; overrides of ``MODEL``'s fields go to its ``ModelSpec``."""
    model = {name: overrides.pop(name, default) for name, default in MODEL.items()}
    kwargs: dict[str, Any] = {
        "model": ModelSpec.model_validate(model),
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 0.1,
        "optimizer": "sgd",
        "momentum": 0.0,
        "seed": 0,
        "steps_per_epoch": 1,
        "total_steps": 1,
    }
    return TrainingPlan(**{**kwargs, **overrides})


def make_fed(**overrides: Any) -> FederatedPlan:
    kwargs: dict[str, Any] = {
        "num_clients": 6,
        "clients_per_round": 3,
        "rounds": 2,
        "local_epochs": 2,
        "partition": "dirichlet",
        "alpha": 0.5,
        "strategy": "fedavg",
        "mu": 0.0,
        "server_learning_rate": 1.0,
        "dropout": 0.0,
        "chunk_size": 2,
    }
    return FederatedPlan(**{**kwargs, **overrides})


def client_dp(fed: FederatedPlan, sigma: float = 1.0) -> FederatedDP:
    q = fed.clients_per_round / fed.num_clients
    return FederatedDP(
        level="client", noise_multiplier=sigma, clip_norm=0.5, sample_rate=q, delta=1e-5
    )


def sample_dp(q: float = 0.25) -> FederatedDP:
    return FederatedDP(
        level="sample", noise_multiplier=1.0, clip_norm=1.0, sample_rate=q, delta=1e-5
    )


def fit(
    *, plan: TrainingPlan, fed: FederatedPlan, dp: FederatedDP | None = None, **kwargs: Any
) -> FederatedResult:
    arrays = kwargs.pop("data", None) or make_data()
    options = {
        "clients_train": None,
        "device": "cpu",
        "dp_seed": 11,
        "record_keys": keys_for(arrays),
        **kwargs,
    }
    return train_federated(**arrays, num_classes=NUM_CLASSES, plan=plan, fed=fed, dp=dp, **options)
