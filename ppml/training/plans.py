"""What a training run is told (plans) and what it reports back (progress, result).

Torch-only, like the rest of ``ppml.training``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from ppml.specs import ModelSpec

__all__ = [
    "DP_ENGINES",
    "OPTIMIZERS",
    "DPPlan",
    "Progress",
    "TrainResult",
    "TrainingCallbacks",
    "TrainingPlan",
]

DP_ENGINES = ("auto", "fast", "opacus")

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float, float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, momentum: torch.optim.SGD(params, lr=lr, momentum=momentum),
    # Adam has no "momentum" knob of that name; its betas stay at the torch defaults.
    "adam": lambda params, lr, _momentum: torch.optim.Adam(params, lr=lr),
}


@dataclass(frozen=True, kw_only=True)
class TrainingPlan:
    """What to train and how, independent of privacy.

    Attributes:
        model: The architecture and its sizes (see ``ppml.architectures``).
        epochs: Number of epochs.
        batch_size: Expected (DP) or exact (non-private) batch size.
        learning_rate: Optimizer step size.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum; ignored by Adam.
        seed: Seeds the initial weights and the non-private shuffling.
        steps_per_epoch: ``ceil(n_train / batch_size)``, computed by the caller.
        total_steps: ``epochs * steps_per_epoch``, computed by the caller.
        eval_loss_clip: Per-example loss bound of the clipped sums ``evaluate`` returns.
        test_units: Privacy unit (e.g. client) of each held-out row, so scores are summed
            per unit; None when every row is its own unit.
        input_shape: The dataset's declared shape of a row (``[C, H, W]`` for cnn2d), or
            None.
        ema_decay: Decay of an exponential moving average of the weights, which the run
            returns instead of the last iterate (``ppml.training.averaging``); 0: none.
    """

    model: ModelSpec
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float = 0.0
    seed: int = 0
    steps_per_epoch: int
    total_steps: int
    eval_loss_clip: float = 4.0
    test_units: npt.NDArray[np.int64] | None = field(default=None, compare=False, hash=False)
    input_shape: tuple[int, ...] | None = None
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}")
        if min(self.epochs, self.batch_size, self.steps_per_epoch) < 1:
            raise ValueError("epochs, batch_size and steps_per_epoch must be positive")
        if self.total_steps != self.epochs * self.steps_per_epoch:
            raise ValueError("total_steps must equal epochs * steps_per_epoch")
        if not self.learning_rate > 0 or not 0 <= self.momentum < 1:
            raise ValueError("learning_rate must be > 0 and momentum in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class DPPlan:
    """The DP-SGD mechanism admitted for this job; used exactly as given.

    Attributes:
        noise_multiplier: sigma, noise std relative to ``max_grad_norm``.
        max_grad_norm: C, the per-sample clipping norm.
        sample_rate: Poisson sampling rate ``q`` (``batch_size / n_train``).
        delta: The job's δ (the ledger, not the training, accounts the job).
        engine: How per-sample gradients are clipped: ``"fast"`` (single backward
            pass, ``ppml.training.fast_dp``), ``"opacus"`` (Opacus hooks), or
            ``"auto"``: fast when it handles every layer natively, else Opacus.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    engine: str = "auto"

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0 or not self.max_grad_norm > 0:
            raise ValueError("noise_multiplier and max_grad_norm must be > 0")
        if not 0 < self.sample_rate <= 1 or not 0 < self.delta < 1:
            raise ValueError("sample_rate must be in (0, 1] and delta in (0, 1)")
        if self.engine not in DP_ENGINES:
            raise ValueError(f"engine must be one of {', '.join(DP_ENGINES)}")


@dataclass(frozen=True, kw_only=True)
class Progress:
    """How far a job has come.

    Attributes:
        steps_done: Optimizer steps taken so far.
        epoch: Completed epochs.
        fraction: ``steps_done / total_steps``.
        scores: The model's held-out scores at this report (``evaluate``'s figures), when
            it was scored here (at epoch ends; federated: at scored rounds). Exact figures:
            the worker shows them to the data's owner only.
    """

    steps_done: int
    epoch: int
    fraction: float
    scores: dict[str, float] | None = None


class TrainingCallbacks(Protocol):
    """Hooks the worker passes in to follow and cancel a job."""

    def on_progress(self, progress: Progress) -> None:
        """Receives progress every ``report_every`` steps, at epoch ends and on stop."""
        ...

    def should_stop(self) -> bool:
        """Checked before every step; ``True`` stops training cleanly."""
        ...


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """The outcome of ``train``.

    Attributes:
        state_dict: Weights of the plain module (no Opacus prefixes), contiguous, on CPU.
        steps_done: Optimizer steps taken (each one charged to the privacy budget).
        stopped: Whether training ended early through ``should_stop``.
        metrics: ``evaluate``'s figures on the held-out arrays (exact ``test_accuracy``
            and ``test_loss``, and the per-unit sums the released metrics are made of).
        device: The device trained on, e.g. ``"cpu"`` or ``"cuda"``.
    """

    state_dict: dict[str, torch.Tensor]
    steps_done: int
    stopped: bool
    metrics: dict[str, float]
    device: str
