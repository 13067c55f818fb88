"""Torch-only training core: model zoo, DP-SGD / non-private loop, safetensors export.

Only the worker imports this package; the API process must never import torch, so
nothing outside ``ppml.training`` imports it at module import time.
"""

from ppml.training.dp_sgd import (
    DPPlan,
    Progress,
    TrainingCallbacks,
    TrainingPlan,
    TrainResult,
    evaluate,
    train,
)
from ppml.training.export import load_model, save_model
from ppml.training.models import build_model

__all__ = [
    "DPPlan",
    "Progress",
    "TrainResult",
    "TrainingCallbacks",
    "TrainingPlan",
    "build_model",
    "evaluate",
    "load_model",
    "save_model",
    "train",
]
