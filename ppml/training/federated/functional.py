"""Building blocks shared by the client trainers: flat parameters, seeds, batch
schedules and a batched (one row per client) version of torch's SGD and Adam.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ppml.privacy import calibration

__all__ = [
    "ParamLayout",
    "StackedOptimizer",
    "client_generator",
    "client_seed",
    "local_steps_per_epoch",
    "plain_schedule",
    "round_seed_sequence",
    "server_noise_seed",
]

# spawn_key tags, so the per-round and per-client streams never collide
_ROUND_TAG, _CLIENT_TAG, _SERVER_NOISE_TAG = 0, 1, 2

# torch.optim.Adam defaults (the TrainingPlan's "adam" keeps them)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def local_steps_per_epoch(sample_rate: float) -> int:
    """Local DP-SGD steps per local epoch at Poisson rate ``q``: the ledger's expression."""
    return calibration.steps_per_epoch(sample_rate)


def round_seed_sequence(base_seed: int, round_index: int) -> np.random.SeedSequence:
    """Seeds the round's client sampling and dropout."""
    return np.random.SeedSequence(base_seed, spawn_key=(_ROUND_TAG, round_index))


def server_noise_seed(base_seed: int) -> int:
    """Seeds the DP-FedAvg server noise generator."""
    seq = np.random.SeedSequence(base_seed, spawn_key=(_SERVER_NOISE_TAG,))
    return int(seq.generate_state(1, dtype=np.uint64)[0])


def client_seed(base_seed: int, round_index: int, client_id: int) -> int:
    """A 64-bit seed for one client in one round, independent of execution order."""
    seq = np.random.SeedSequence(base_seed, spawn_key=(_CLIENT_TAG, round_index, client_id))
    return int(seq.generate_state(1, dtype=np.uint64)[0])


def client_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def plain_schedule(
    num_rows: int, batch_size: int, epochs: int, generator: torch.Generator
) -> torch.Tensor:
    """Shuffled minibatches: ``(epochs · ceil(n/B), B)`` local row positions, -1 = padding.

    Each epoch is a fresh permutation drawn from ``generator``; its last batch may be
    short (padded with -1).
    """
    padding = math.ceil(num_rows / batch_size) * batch_size - num_rows
    device = generator.device
    parts = []  # called for every client of every round: as few tensor calls as possible
    for _ in range(epochs):
        parts.append(torch.randperm(num_rows, generator=generator, device=device))
        if padding:
            parts.append(torch.full((padding,), -1, dtype=torch.long, device=device))
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    return flat.view(-1, batch_size)


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a module's parameters, in module order, for flat vectors."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, module: nn.Module) -> ParamLayout:
        named = list(module.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, params: Mapping[str, torch.Tensor], lead: int = 0) -> torch.Tensor:
        """Concatenates ``params`` (with ``lead`` leading batch dims) into ``(..., P)``."""
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            tensor = params[name]
            parts.append(tensor.reshape(*tensor.shape[:lead], math.prod(shape)))
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def load(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Copies ``(P,)`` into the module's parameters.

        (``vector_to_parameters`` would make them views of ``flat``, so training the
        module would silently change ``flat``.)
        """
        params = dict(module.named_parameters())
        for name, value in self.unflatten(flat).items():
            params[name].copy_(value)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``(..., P)`` as a name → tensor dict with the leading dims kept."""
        lead = flat.shape[:-1]
        pieces = flat.split(self.numels, dim=-1)
        return {
            name: piece.view(*lead, *shape)
            for name, shape, piece in zip(self.names, self.shapes, pieces, strict=True)
        }


class StackedOptimizer:
    """torch's SGD (momentum, no dampening) or Adam on stacked tensors ``(k, ...)``.

    Updates ``params`` in place (they are views of the chunk's flat ``(k, P)`` matrix),
    with ``torch._foreach`` kernels: the vectorised path is bound by memory traffic
    over the stacked parameters, so every pass over them counts. The arithmetic
    follows torch's single-tensor implementations, so a client trained here matches
    one trained with ``torch.optim`` to float rounding.

    A client whose row is inactive is done: its parameters no longer change (its
    optimizer state may, and is never read again). Rows must therefore go inactive for
    good, which holds because every client's steps come first in its schedule.
    """

    def __init__(self, kind: str, *, learning_rate: float, momentum: float) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {kind!r}")
        self.kind, self.lr, self.momentum = kind, learning_rate, momentum
        self._calls = 0
        self._done: torch.Tensor | None = None
        self._buf: list[torch.Tensor] = []
        self._sq: list[torch.Tensor] = []

    def step(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], active: torch.Tensor
    ) -> None:
        """One step on the rows where the CPU bool tensor ``active`` is set."""
        self._check_active(active)
        self._calls += 1
        if self.kind == "sgd":
            direction, scale = self._sgd(grads), -self.lr
        else:
            direction, scale = self._adam(grads)
        if not bool(active.all()):
            mask = active.to(device=params[0].device, dtype=params[0].dtype)
            direction = [d * mask.view(-1, *[1] * (d.dim() - 1)) for d in direction]
        torch._foreach_add_(params, direction, alpha=scale)

    def _check_active(self, active: torch.Tensor) -> None:
        if self._done is not None and bool((active & self._done).any()):
            raise RuntimeError("a client row became active again")
        self._done = ~active if self._done is None else self._done | ~active

    def _sgd(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.momentum == 0:
            return grads
        if not self._buf:  # torch starts the buffer at the first gradient
            self._buf = [g.clone() for g in grads]
        else:
            torch._foreach_mul_(self._buf, self.momentum)
            torch._foreach_add_(self._buf, grads)
        return self._buf

    def _adam(self, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        beta1, beta2 = ADAM_BETAS
        if not self._buf:
            self._buf = [torch.zeros_like(g) for g in grads]
            self._sq = [torch.zeros_like(g) for g in grads]
        torch._foreach_lerp_(self._buf, grads, 1 - beta1)
        torch._foreach_mul_(self._sq, beta2)
        torch._foreach_addcmul_(self._sq, grads, grads, value=1 - beta2)
        # Every active row has stepped exactly ``_calls`` times (rows only drop out).
        bias1, bias2 = 1 - beta1**self._calls, 1 - beta2**self._calls
        denom = torch._foreach_sqrt(self._sq)
        torch._foreach_div_(denom, bias2**0.5)
        torch._foreach_add_(denom, ADAM_EPS)
        return list(torch._foreach_div(self._buf, denom)), -self.lr / bias1
