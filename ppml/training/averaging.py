"""An exponential moving average (EMA) of a model's weights during training.

De et al. 2022 ("Unlocking high-accuracy differentially private image classification
through scale") report that an EMA of the DP-SGD iterates is worth several points at every
ε. The average is a function of the iterates alone, which are themselves functions of the
already-noised updates: it is post-processing, so it changes neither σ, the sampling, nor
the accounting (tests hold it: same noise, same trajectory, the average computed by hand).

The decay warms up as ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates (TensorFlow's
``ExponentialMovingAverage`` with ``num_updates``), so the first steps' random initial
weights do not linger in a short run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """The EMA of ``module``'s parameters, updated after every optimizer step."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError("decay must be in (0, 1)")
        self._decay = decay
        self._params = list(module.parameters())
        self._shadow = [p.detach().clone() for p in self._params]
        self._updates = 0

    def update(self) -> None:
        """Moves the average towards the current weights."""
        self._updates += 1
        decay = min(self._decay, (1 + self._updates) / (10 + self._updates))
        with torch.no_grad():
            current = [p.detach() for p in self._params]
            torch._foreach_lerp_(self._shadow, current, 1.0 - decay)

    @torch.no_grad()
    def copy_to_module(self) -> None:
        """Replaces the module's weights by their average (the end of training)."""
        for param, average in zip(self._params, self._shadow, strict=True):
            param.copy_(average)

    def state(self) -> dict[str, Any]:
        """The average and its update count, for a checkpoint."""
        return {"average": [s.clone() for s in self._shadow], "average_updates": self._updates}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state`'s output; a checkpoint without one keeps the current
        weights as the average (a job checkpointed before it averaged)."""
        if "average" not in state:
            self._shadow = [p.detach().clone() for p in self._params]
            return
        for shadow, saved in zip(self._shadow, state["average"], strict=True):
            shadow.copy_(saved.to(shadow.device))
        self._updates = int(state["average_updates"])
