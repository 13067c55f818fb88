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
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn import functional as F

from ppml.training.checkpoint import CheckpointSink, snapshot, start_of
from ppml.training.fast_dp import FastDPEngine, unsupported_layers
from ppml.training.models import ARCHITECTURES, build_model

__all__ = [
    "OPTIMIZERS",
    "DPPlan",
    "Progress",
    "TrainResult",
    "TrainingCallbacks",
    "TrainingPlan",
    "evaluate",
    "train",
]

EVAL_BATCH_ROWS = 4096
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
        arch: Architecture registry name (see ``ppml.training.models``).
        hidden_sizes: Hidden widths (``mlp``).
        channels: Convolution channels (``cnn1d``).
        kernel_size: Convolution kernel width (``cnn1d``).
        epochs: Number of epochs.
        batch_size: Expected (DP) or exact (non-private) batch size.
        learning_rate: Optimizer step size.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum; ignored by Adam.
        seed: Seeds the initial weights and the non-private shuffling.
        steps_per_epoch: ``ceil(n_train / batch_size)``, computed by the caller.
        total_steps: ``epochs * steps_per_epoch``, computed by the caller.
    """

    arch: str
    hidden_sizes: tuple[int, ...]
    channels: tuple[int, ...]
    kernel_size: int
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float = 0.0
    seed: int = 0
    steps_per_epoch: int
    total_steps: int

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}")
        if min(self.epochs, self.batch_size, self.steps_per_epoch) < 1:
            raise ValueError("epochs, batch_size and steps_per_epoch must be positive")
        if self.total_steps != self.epochs * self.steps_per_epoch:
            raise ValueError("total_steps must equal epochs * steps_per_epoch")
        if not self.learning_rate > 0 or not 0 <= self.momentum < 1:
            raise ValueError("learning_rate must be > 0 and momentum in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class DPPlan:
    """The DP-SGD mechanism admitted for this job; used exactly as given.

    Attributes:
        noise_multiplier: sigma, noise std relative to ``max_grad_norm``.
        max_grad_norm: C, the per-sample clipping norm.
        sample_rate: Poisson sampling rate ``q`` (``batch_size / n_train``).
        delta: δ at which ``epsilon_opacus`` is reported.
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
    """

    steps_done: int
    epoch: int
    fraction: float


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
        metrics: ``test_accuracy`` and ``test_loss`` on the held-out arrays.
        epsilon_opacus: ε at ``dp.delta`` from Opacus' RDP accountant; None if non-private.
        device: The device trained on, e.g. ``"cpu"`` or ``"cuda"``.
    """

    state_dict: dict[str, torch.Tensor]
    steps_done: int
    stopped: bool
    metrics: dict[str, float]
    epsilon_opacus: float | None
    device: str


class _Stepper(Protocol):
    module: nn.Module

    def step(self, step_index: int) -> None: ...

    def epsilon(self) -> float | None: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: Mapping[str, Any], steps_done: int) -> None: ...


def _model_and_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": module.state_dict(), "optimizer": optimizer.state_dict()}


def _restore(module: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


class _PlainStepper:
    """Ordinary shuffled minibatches; epoch ``e`` uses a permutation seeded by (seed, e)."""

    def __init__(
        self, module: nn.Module, data: tuple[torch.Tensor, torch.Tensor], plan: TrainingPlan
    ) -> None:
        self.module = module
        self._x, self._y = data
        self._plan = plan
        self._optimizer = OPTIMIZERS[plan.optimizer](
            list(module.parameters()), plan.learning_rate, plan.momentum
        )
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            # Derived per epoch, so a resumed job can rebuild it without replaying.
            seed = int(np.random.SeedSequence([self._plan.seed, epoch]).generate_state(1)[0])
            gen = torch.Generator().manual_seed(seed)
            self._perm = torch.randperm(len(self._x), generator=gen).to(self._x.device)
            self._epoch = epoch
        return self._perm

    def step(self, step_index: int) -> None:
        epoch, within = divmod(step_index, self._plan.steps_per_epoch)
        perm = self._permutation(epoch)
        start = (within * self._plan.batch_size) % len(perm)
        rows = perm[start : start + self._plan.batch_size]
        self._optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.module(self._x[rows]), self._y[rows]).backward()
        self._optimizer.step()

    def epsilon(self) -> float | None:
        return None

    def state(self) -> dict[str, Any]:
        return _model_and_optimizer(self.module, self._optimizer)

    def load_state(self, state: Mapping[str, Any], steps_done: int) -> None:
        del steps_done  # the permutation of every epoch is derived, not replayed
        _restore(self.module, self._optimizer, state)


class _PrivateStepper:
    """DP-SGD: Poisson-sampled batches, per-sample clipping and Gaussian noise."""

    def __init__(
        self,
        module: nn.Module,
        data: tuple[torch.Tensor, torch.Tensor],
        plan: TrainingPlan,
        dp: DPPlan,
        generator: torch.Generator,
    ) -> None:
        self.module = module
        self._x, self._y = data
        self._dp = dp
        self._generator = generator
        self._accountant = RDPAccountant()
        self._engine: FastDPEngine | None = None
        self._gsm: GradSampleModule | None = None
        self._optimizer: torch.optim.Optimizer
        if dp.engine == "fast" or (dp.engine == "auto" and not unsupported_layers(module)):
            self._engine = FastDPEngine(
                module,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                expected_batch_size=plan.batch_size,
                generator=generator,
            )
            self._optimizer = OPTIMIZERS[plan.optimizer](
                list(module.parameters()), plan.learning_rate, plan.momentum
            )
        else:
            # Summed loss (not mean): an empty Poisson batch then has loss 0, not NaN;
            # DPOptimizer still divides the noisy sum by the *expected* batch size.
            self._gsm = GradSampleModule(module, loss_reduction="sum", strict=True)
            base = OPTIMIZERS[plan.optimizer](
                list(self._gsm.parameters()), plan.learning_rate, plan.momentum
            )
            self._optimizer = DPOptimizer(
                base,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                expected_batch_size=plan.batch_size,
                loss_reduction="mean",
                generator=generator,
            )

    def step(self, step_index: int) -> None:
        del step_index  # every step samples afresh; nothing depends on the index
        mask = (
            torch.rand(len(self._x), generator=self._generator, device=self._x.device)
            < self._dp.sample_rate
        )
        if self._gsm is not None:
            self._optimizer.zero_grad(set_to_none=True)
            logits = self._gsm(self._x[mask])
            F.cross_entropy(logits, self._y[mask], reduction="sum").backward()
        elif self._engine is not None:
            rows = mask.nonzero().squeeze(1)  # the same rows as x[mask], found once
            logits = self.module(self._x.index_select(0, rows))
            loss = F.cross_entropy(logits, self._y.index_select(0, rows), reduction="sum")
            self._engine.backward(loss)  # sets every p.grad (noise alone if no rows)
        self._optimizer.step()
        self._accountant.step(
            noise_multiplier=self._dp.noise_multiplier, sample_rate=self._dp.sample_rate
        )

    def epsilon(self) -> float | None:
        return float(self._accountant.get_epsilon(delta=self._dp.delta))

    def state(self) -> dict[str, Any]:
        # Not the generator: a resumed run draws fresh secret randomness (see checkpoint).
        return _model_and_optimizer(self.module, self._optimizer)

    def load_state(self, state: Mapping[str, Any], steps_done: int) -> None:
        _restore(self.module, self._optimizer, state)
        if steps_done:
            self._accountant.history = [
                (self._dp.noise_multiplier, self._dp.sample_rate, steps_done)
            ]

    def close(self) -> None:
        """Removes the engine's hooks so ``module`` is a plain module again."""
        if self._gsm is not None:
            self._gsm.to_standard_module()
        if self._engine is not None:
            self._engine.close()


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
            plan.arch,
            num_features=num_features,
            num_classes=num_classes,
            hidden_sizes=plan.hidden_sizes,
            channels=plan.channels,
            kernel_size=plan.kernel_size,
        )


def _dp_generator(device: torch.device, dp_seed: int | None) -> torch.Generator:
    seed = secrets.randbits(63) if dp_seed is None else dp_seed
    return torch.Generator(device=device).manual_seed(seed)


def _report(callbacks: TrainingCallbacks | None, plan: TrainingPlan, steps_done: int) -> None:
    if callbacks is not None:
        progress = Progress(
            steps_done=steps_done,
            epoch=steps_done // plan.steps_per_epoch,
            fraction=steps_done / plan.total_steps,
        )
        callbacks.on_progress(progress)


def _run_steps(
    stepper: _Stepper,
    plan: TrainingPlan,
    callbacks: TrainingCallbacks | None,
    report_every: int,
    start_step: int = 0,
    checkpoint: CheckpointSink | None = None,
) -> tuple[int, bool]:
    """Runs steps ``start_step .. total_steps - 1``; returns (steps_done, stopped).

    At every report short of the end, the checkpoint is written first, so a report never
    claims steps that a resumed run would not find.
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
            _report(callbacks, plan, steps_done)
            reported = steps_done
    return steps_done, False


@torch.no_grad()
def evaluate(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_rows: int = EVAL_BATCH_ROWS
) -> dict[str, float]:
    """Computes accuracy and mean cross-entropy in eval mode, ``batch_rows`` at a time.

    Args:
        module: The model; left in eval mode.
        x: Features ``(n, d)`` on the module's device.
        y: Labels ``(n,)``.
        batch_rows: Rows per forward pass.

    Returns:
        ``{"test_accuracy": ..., "test_loss": ...}``.
    """
    module.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_rows):
        logits = module(x[start : start + batch_rows])
        labels = y[start : start + batch_rows]
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    return {"test_accuracy": correct / len(x), "test_loss": loss_sum / len(x)}


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
        The trained weights, steps taken, test metrics and Opacus' ε.

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
    stepper: _PlainStepper | _PrivateStepper
    if dp is None:
        stepper = _PlainStepper(module, train_data, plan)
    else:
        stepper = _PrivateStepper(module, train_data, plan, dp, _dp_generator(dev, dp_seed))
    if resume is not None:
        stepper.load_state(resume, start)
    with warnings.catch_warnings():
        # Opacus' hooks on the first layer fire although the input needs no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        steps_done, stopped = _run_steps(
            stepper, plan, callbacks, report_every, start_step=start, checkpoint=checkpoint
        )
    if isinstance(stepper, _PrivateStepper):
        stepper.close()
    weights = module.state_dict()
    return TrainResult(
        state_dict={k: v.detach().cpu().contiguous().clone() for k, v in weights.items()},
        steps_done=steps_done,
        stopped=stopped,
        metrics=evaluate(module, x_te, y_te),
        epsilon_opacus=stepper.epsilon(),
        device=str(dev),
    )
