"""Steppers: one optimizer step of DP-SGD or of plain training, for a given step index.

A stepper also hands out and takes back its state (model and optimizer) for checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn import functional as F

from ppml.training.averaging import WeightAverage
from ppml.training.fast_dp import FastDPEngine, unsupported_layers
from ppml.training.plans import OPTIMIZERS, DPPlan, TrainingPlan

__all__ = ["AveragedStepper", "PlainStepper", "PrivateStepper", "Stepper"]


class Stepper(Protocol):
    module: nn.Module

    def step(self, step_index: int) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: Mapping[str, Any], steps_done: int) -> None: ...


def _model_and_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": module.state_dict(), "optimizer": optimizer.state_dict()}


def _restore(module: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


class PlainStepper:
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

    def state(self) -> dict[str, Any]:
        return _model_and_optimizer(self.module, self._optimizer)

    def load_state(self, state: Mapping[str, Any], steps_done: int) -> None:
        del steps_done  # the permutation of every epoch is derived, not replayed
        _restore(self.module, self._optimizer, state)


class PrivateStepper:
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
        self._engine: FastDPEngine | None = None
        self._gsm: GradSampleModule | None = None
        self._optimizer: torch.optim.Optimizer
        if dp.engine == "fast" or (dp.engine == "auto" and not unsupported_layers(module)):
            self._engine = self._fast_engine(module, plan, dp, generator)
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

    def _fast_engine(
        self, module: nn.Module, plan: TrainingPlan, dp: DPPlan, generator: torch.Generator
    ) -> FastDPEngine:
        return FastDPEngine(
            module,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=plan.batch_size,
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

    def state(self) -> dict[str, Any]:
        # Not the generator: a resumed run draws fresh secret randomness (see checkpoint).
        return _model_and_optimizer(self.module, self._optimizer)

    def load_state(self, state: Mapping[str, Any], steps_done: int) -> None:
        del steps_done  # the ledger, not the stepper, counts what was spent
        _restore(self.module, self._optimizer, state)

    def close(self) -> None:
        """Removes the engine's hooks so ``module`` is a plain module again."""
        if self._gsm is not None:
            self._gsm.to_standard_module()
        if self._engine is not None:
            self._engine.close()


class AveragedStepper:
    """Another stepper whose weights are averaged after every step (``WeightAverage``):
    the same steps, the same noise, and an average kept beside them (post-processing)."""

    def __init__(self, inner: PlainStepper | PrivateStepper, decay: float) -> None:
        self.inner = inner
        self.module = inner.module
        self.average = WeightAverage(inner.module, decay)

    def step(self, step_index: int) -> None:
        self.inner.step(step_index)
        self.average.update()

    def state(self) -> dict[str, Any]:
        return {**self.inner.state(), **self.average.state()}

    def load_state(self, state: Mapping[str, Any], steps_done: int) -> None:
        self.inner.load_state(state, steps_done)
        self.average.load_state(state)
