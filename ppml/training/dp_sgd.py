"""DP-SGD (Opacus, Poisson sampling) and the non-private training loop.

The whole dataset lives as tensors on the training device and batches are drawn by
index, so no DataLoader (and no worker process) is involved. One loop drives both
paths; a *stepper* takes one optimizer step for a given global step index, which is
what a later resume from ``start_step`` needs.

Privacy notes:

* The sampling rate ``q`` and noise multiplier ``sigma`` come from admission and are used
  exactly: every step draws a Poisson mask ``rand(n) < q`` and Opacus adds
  ``N(0, (sigma * C)^2)`` noise even to an empty batch, matching the accountant.
* Two engines compute the same clipped, noised gradient: Opacus (``GradSampleModule``
  hooks and ``DPOptimizer``) and ``ppml.training.fast_dp`` (one backward pass, ghost
  norms). ``DPPlan.engine`` picks one; ``"auto"`` takes the fast engine when it
  supports every layer. Both draw masks and noise from the same generator in the same
  order, so the choice changes speed, not the mechanism or its accounting.
* The Poisson masks and the noise must stay secret: with a known seed an analyst could
  regenerate the noise and subtract it, or learn which rows were in each batch (which
  voids the amplification by subsampling). They are therefore drawn from a generator
  seeded by the OS CSPRNG; ``plan.seed`` only fixes the (data-independent) initial
  weights and the non-private shuffling. ``dp_seed`` exists for tests only.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F

from ppml.training.checkpoint import CheckpointSink, snapshot, start_of
from ppml.training.models import build_model
from ppml.training.plans import (
    DP_ENGINES,
    OPTIMIZERS,
    DPPlan,
    Progress,
    TrainingCallbacks,
    TrainingPlan,
    TrainResult,
)
from ppml.training.steppers import AveragedStepper, PlainStepper, PrivateStepper, Stepper

__all__ = [
    "DP_ENGINES",
    "OPTIMIZERS",
    "DPPlan",
    "Progress",
    "TrainResult",
    "TrainingCallbacks",
    "TrainingPlan",
    "evaluate",
    "score",
    "train",
]

EVAL_BATCH_ROWS = 4096


def to_tensors(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    *,
    num_classes: int,
    device: torch.device,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Messages name the array, never its values (they are private data).
    x_arr = np.ascontiguousarray(x, dtype=np.float32)
    y_arr = np.ascontiguousarray(y, dtype=np.int64)
    if x_arr.ndim != 2 or y_arr.ndim != 1 or len(x_arr) != len(y_arr) or len(x_arr) == 0:
        raise ValueError(f"{name}: expected non-empty x (n, d) and y (n,)")
    if not np.isfinite(x_arr).all():
        raise ValueError(f"{name}: features must be finite")
    if y_arr.min() < 0 or y_arr.max() >= num_classes:
        raise ValueError(f"{name}: labels must lie in 0..num_classes-1")
    return torch.from_numpy(x_arr).to(device), torch.from_numpy(y_arr).to(device)


def initial_model(plan: TrainingPlan, num_features: int, num_classes: int) -> nn.Module:
    # Fork the CPU RNG so seeding does not disturb the caller's global state, and build
    # on CPU so the same seed gives the same initial weights on every device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        return build_model(
            plan.model,
            num_features=num_features,
            num_classes=num_classes,
            input_shape=plan.input_shape,
        )


def _dp_generator(device: torch.device, dp_seed: int | None) -> torch.Generator:
    seed = secrets.randbits(63) if dp_seed is None else dp_seed
    return torch.Generator(device=device).manual_seed(seed)


def _report(
    callbacks: TrainingCallbacks | None,
    plan: TrainingPlan,
    steps_done: int,
    scorer: Callable[[], dict[str, float]] | None = None,
) -> None:
    if callbacks is not None:
        progress = Progress(
            steps_done=steps_done,
            epoch=steps_done // plan.steps_per_epoch,
            fraction=steps_done / plan.total_steps,
            scores=scorer() if scorer is not None else None,
        )
        callbacks.on_progress(progress)


def _run_steps(
    stepper: Stepper,
    plan: TrainingPlan,
    callbacks: TrainingCallbacks | None,
    report_every: int,
    start_step: int = 0,
    checkpoint: CheckpointSink | None = None,
    scorer: Callable[[], dict[str, float]] | None = None,
) -> tuple[int, bool]:
    """Runs steps ``start_step .. total_steps - 1``; returns (steps_done, stopped).

    At every report short of the end, the checkpoint is written first, so a report never
    claims steps that a resumed run would not find. Reports at epoch ends carry the
    ``scorer``'s held-out scores (the per-epoch history).
    """
    steps_done, reported = start_step, -1
    for step_index in range(start_step, plan.total_steps):
        if callbacks is not None and callbacks.should_stop():
            if reported != steps_done:
                _report(callbacks, plan, steps_done)
            return steps_done, True
        stepper.step(step_index)
        steps_done = step_index + 1
        if steps_done % report_every == 0 or steps_done % plan.steps_per_epoch == 0:
            if checkpoint is not None and steps_done < plan.total_steps:
                state = {"kind": "centralised", "steps": steps_done, **stepper.state()}
                checkpoint(snapshot(state))
            epoch_end = steps_done % plan.steps_per_epoch == 0
            _report(callbacks, plan, steps_done, scorer if epoch_end else None)
            reported = steps_done
    return steps_done, False


@torch.no_grad()
def evaluate(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_clip: float = 4.0,
    units: torch.Tensor | None = None,
    batch_rows: int = EVAL_BATCH_ROWS,
) -> dict[str, float]:
    """Scores the model in eval mode, ``batch_rows`` at a time.

    Besides the exact figures (for the data's owner), it sums per privacy unit the fraction
    of the unit's rows predicted correctly and the unit's mean loss clipped to
    ``loss_clip``: each unit moves those sums by at most 1 and ``loss_clip``, which is what
    the Gaussian release in ``ppml.privacy.evaluation`` relies on.

    Args:
        module: The model; left in eval mode.
        x: Features ``(n, d)`` on the module's device.
        y: Labels ``(n,)``.
        loss_clip: Per-example cross-entropy bound of the clipped sums.
        units: Unit index of each row (e.g. its client), ``(n,)``; None: one unit a row.
        batch_rows: Rows per forward pass.

    Returns:
        ``test_accuracy``, ``test_loss`` (exact), ``rows``, ``units``,
        ``unit_correct_sum`` and ``unit_clipped_loss_sum``.
    """
    module.eval()
    correct_rows, loss_rows = [], []
    for start in range(0, len(x), batch_rows):
        logits = module(x[start : start + batch_rows])
        labels = y[start : start + batch_rows]
        loss_rows.append(F.cross_entropy(logits, labels, reduction="none").double())
        correct_rows.append((logits.argmax(dim=1) == labels).double())
    correct, loss = torch.cat(correct_rows), torch.cat(loss_rows)
    clipped = loss.clamp(min=0.0, max=loss_clip)
    n = len(x)
    if units is None:
        count, correct_sum, clipped_sum = n, float(correct.sum()), float(clipped.sum())
    else:
        sizes = torch.bincount(units).double()
        present = sizes > 0
        per_unit = sizes.new_zeros((2, len(sizes)))
        per_unit[0].scatter_add_(0, units, correct)
        per_unit[1].scatter_add_(0, units, clipped)
        means = per_unit[:, present] / sizes[present]
        count, correct_sum, clipped_sum = int(present.sum()), *(float(v) for v in means.sum(1))
    return {
        "test_accuracy": float(correct.sum()) / n,
        "test_loss": float(loss.sum()) / n,
        "rows": float(n),
        "units": float(count),
        "unit_correct_sum": correct_sum,
        "unit_clipped_loss_sum": clipped_sum,
    }


def score(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: TrainingPlan
) -> dict[str, float]:
    """``evaluate`` with the plan's loss bound and held-out units."""
    units = None
    if plan.test_units is not None:
        units = torch.from_numpy(np.ascontiguousarray(plan.test_units, dtype=np.int64))
        units = units.to(x.device)
    return evaluate(module, x, y, loss_clip=plan.eval_loss_clip, units=units)


def _score_and_resume(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: TrainingPlan
) -> dict[str, float]:
    """Scores the model between steps, then puts it back in training mode."""
    try:
        return score(module, x, y, plan)
    finally:
        module.train()


def train(
    *,
    x_train: npt.NDArray[np.float32],
    y_train: npt.NDArray[np.int64],
    x_test: npt.NDArray[np.float32],
    y_test: npt.NDArray[np.int64],
    num_classes: int,
    plan: TrainingPlan,
    dp: DPPlan | None,
    callbacks: TrainingCallbacks | None = None,
    report_every: int = 50,
    device: str | None = None,
    dp_seed: int | None = None,
    checkpoint: CheckpointSink | None = None,
    resume: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Trains a model privately (DP-SGD) or not, and scores it on held-out data.

    Args:
        x_train: Training features, float32 ``(n, d)``.
        y_train: Training labels, int64 in ``0..num_classes-1``.
        x_test: Held-out features ``(m, d)``.
        y_test: Held-out labels ``(m,)``.
        num_classes: Number of classes ``K``.
        plan: Architecture, optimizer and step schedule.
        dp: The admitted DP-SGD mechanism, or None for non-private training.
        callbacks: Progress reporting and cancellation hooks.
        report_every: Report progress every this many steps (and at epoch ends).
        device: Torch device; defaults to ``"cuda"`` when available, else ``"cpu"``.
        dp_seed: Seeds the Poisson masks and the noise. Tests only: None (the default,
            required in production) draws a secret seed from the OS, because anyone
            who knows this seed can undo the noise.
        checkpoint: Receives the training state at every report short of the end
            (see ``ppml.training.checkpoint``).
        resume: A state ``checkpoint`` received: training continues from its step, and
            ``steps_done`` counts the steps before it too.

    Returns:
        The trained weights, steps taken, test metrics.

    Raises:
        ValueError: If the arrays are malformed, ``report_every`` is not positive or
            ``resume`` is not a checkpoint of this kind of training.
    """
    if report_every < 1:
        raise ValueError("report_every must be positive")
    start = start_of(resume, kind="centralised", key="steps", limit=plan.total_steps)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_data = to_tensors(x_train, y_train, num_classes=num_classes, device=dev, name="train")
    x_te, y_te = to_tensors(x_test, y_test, num_classes=num_classes, device=dev, name="test")
    if x_te.shape[1] != train_data[0].shape[1]:
        raise ValueError("train and test must have the same number of features")
    module = initial_model(plan, train_data[0].shape[1], num_classes).to(dev)
    module.train()
    inner: PlainStepper | PrivateStepper
    if dp is None:
        inner = PlainStepper(module, train_data, plan)
    else:
        inner = PrivateStepper(module, train_data, plan, dp, _dp_generator(dev, dp_seed))
    stepper: Stepper = inner if plan.ema_decay == 0 else AveragedStepper(inner, plan.ema_decay)
    if resume is not None:
        stepper.load_state(resume, start)
    with warnings.catch_warnings():
        # Opacus' hooks on the first layer fire although the input needs no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        steps_done, stopped = _run_steps(
            stepper,
            plan,
            callbacks,
            report_every,
            start_step=start,
            checkpoint=checkpoint,
            scorer=lambda: _score_and_resume(module, x_te, y_te, plan),
        )
    if isinstance(inner, PrivateStepper):
        inner.close()
    if isinstance(stepper, AveragedStepper):
        stepper.average.copy_to_module()  # the average is the model (post-processing)
    weights = module.state_dict()
    return TrainResult(
        state_dict={k: v.detach().cpu().contiguous().clone() for k, v in weights.items()},
        steps_done=steps_done,
        stopped=stopped,
        metrics=score(module, x_te, y_te, plan),
        device=str(dev),
    )
