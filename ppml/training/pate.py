"""PATE's teachers: one ordinary (non-private) model per disjoint partition of the records.

No DP inside a teacher: the privacy of PATE is in the noisy aggregation of their votes
(``ppml.privacy.gnmax``), which holds because each record is in exactly one partition and
so can change at most one teacher's vote. A teacher's training randomness (``seed``) is
fixed before any data is seen. An empty partition gives an untrained teacher (its initial
weights): it still casts exactly one vote per query.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ppml.architectures import InputShape
from ppml.specs import ModelSpec, TrainingSpec
from ppml.training.dp_sgd import TrainingPlan, initial_model, train

__all__ = ["teacher_logits", "train_student", "train_teachers"]


def _plan(
    model: ModelSpec, training: TrainingSpec, rows: int, input_shape: InputShape | None
) -> TrainingPlan:
    per_epoch = max(1, math.ceil(rows / training.batch_size))
    return TrainingPlan(
        model=model,
        epochs=training.epochs,
        batch_size=training.batch_size,
        learning_rate=training.learning_rate,
        optimizer=training.optimizer,
        momentum=training.momentum,
        ema_decay=training.ema_decay,
        seed=training.seed,
        steps_per_epoch=per_epoch,
        total_steps=training.epochs * per_epoch,
        input_shape=input_shape,
    )


def train_teachers(
    *,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    partitions: Sequence[npt.NDArray[np.int64]],
    num_classes: int,
    model: ModelSpec,
    training: TrainingSpec,
    input_shape: InputShape | None = None,
    progress: Callable[[int], bool] | None = None,
    device: str | None = "cpu",
) -> list[dict[str, torch.Tensor]] | None:
    """Train one teacher per partition (index arrays into ``x``, disjoint).

    Args:
        progress: Called with the number of teachers trained so far; returning False stops
            the run (a cancel), which then returns None.

    Returns:
        Each teacher's weights, in partition order; None when stopped.
    """
    weights: list[dict[str, torch.Tensor]] = []
    for index, rows in enumerate(partitions):
        if progress is not None and not progress(index):
            return None
        plan = _plan(model, training, len(rows), input_shape)
        if len(rows) == 0:
            module = initial_model(plan, x.shape[1], num_classes)
            weights.append({k: v.detach().clone() for k, v in module.state_dict().items()})
            continue
        part_x, part_y = x[rows], y[rows]
        result: Any = train(
            x_train=part_x,
            y_train=part_y,
            # Teachers are not scored: one row keeps train()'s final score cheap.
            x_test=part_x[:1],
            y_test=part_y[:1],
            num_classes=num_classes,
            plan=plan,
            dp=None,
            device=device,
        )
        weights.append(result.state_dict)
    return weights


def teacher_logits(
    weights: Sequence[dict[str, torch.Tensor]],
    *,
    model: ModelSpec,
    num_classes: int,
    x: npt.NDArray[np.float32],
    input_shape: InputShape | None = None,
) -> npt.NDArray[np.float32]:
    """Every teacher's logits on ``x``: ``(n, k, K)``, as the exported graph computes them."""
    from ppml.training.models import build_model

    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = []
    with torch.no_grad():
        for state in weights:
            module = build_model(
                model, num_features=x.shape[1], num_classes=num_classes, input_shape=input_shape
            )
            module.load_state_dict(state)
            out.append(module.eval()(inputs).numpy())
    logits: npt.NDArray[np.float32] = np.stack(out, axis=1)
    return logits


def train_student(
    *,
    x: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    num_classes: int,
    model: ModelSpec,
    training: TrainingSpec,
    input_shape: InputShape | None = None,
    device: str | None = "cpu",
) -> dict[str, torch.Tensor]:
    """A student (no DP) on public rows and the teachers' noisy labels: post-processing of
    the answers. Not scored here (held-out rows are protected)."""
    plan = _plan(model, training, len(labels), input_shape)
    result = train(
        x_train=x,
        y_train=labels,
        x_test=x[:1],
        y_test=labels[:1],
        num_classes=num_classes,
        plan=plan,
        dp=None,
        device=device,
    )
    state: dict[str, torch.Tensor] = result.state_dict
    return state
