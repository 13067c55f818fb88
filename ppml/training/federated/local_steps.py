"""The local steps of a chunk of clients, as stacked ``(k, B, ...)`` batches.

Every client draws its batches from its own generator, in the order the one-by-one
trainer does (so both trainers see the same rows); the stacking, padding and row
gathering are then done for the whole chunk at once, because per-client tensor calls
cost more than the maths when clients hold a few dozen rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from ppml.training.federated.batched_mlp import Targets
from ppml.training.federated.functional import plain_schedule

__all__ = ["GATHER_BYTES", "LocalStep", "plain_steps", "poisson_steps"]

GATHER_BYTES = 16 << 20  # a chunk's training inputs are gathered at most this much at a time

# Precomputes loss weights from stacked labels and masks ``(steps, k, B)``.
TargetsFn = Callable[[torch.Tensor, torch.Tensor], Targets]


@dataclass(frozen=True, kw_only=True)
class LocalStep:
    """One local step of a chunk of ``k`` clients.

    Attributes:
        x: Inputs ``(k, B, ...)``.
        y: Labels ``(k, B)``.
        mask: 1.0 for real rows, 0.0 for padding ``(k, B)``.
        active: Whether each client still trains ``(k,)`` (bool, on CPU).
        targets: Precomputed loss weights, when a ``targets`` function was given.
    """

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    active: torch.Tensor
    targets: Targets | None = None


def plain_steps(
    x: torch.Tensor,
    y: torch.Tensor,
    shards: Sequence[torch.Tensor],
    epochs: Sequence[int],
    gens: Sequence[torch.Generator],
    *,
    batch_size: int,
    targets: TargetsFn | None = None,
) -> Iterator[LocalStep]:
    """Shuffled minibatches of every client, padded to the longest schedule.

    Args:
        x: All training inputs ``(n, ...)``.
        y: All training labels ``(n,)``.
        shards: Each client's rows (global indices).
        epochs: Each client's local epochs.
        gens: Each client's generator (one ``randperm`` per epoch is drawn from it).
        batch_size: Rows per batch (a short last batch per epoch is padded).
        targets: If given, ``LocalStep.targets`` is computed, for all steps of a gathered
            window at once.

    Yields:
        The steps in order; a client whose schedule has ended has an all-zero mask and
        is inactive. Inputs are gathered ``GATHER_BYTES`` at a time as ``(steps, k, B,
        ...)`` tensors, so every step's ``x`` is contiguous.
    """
    schedules = [
        plain_schedule(len(rows), batch_size, e, g)
        for rows, e, g in zip(shards, epochs, gens, strict=True)
    ]
    lengths = torch.tensor([len(sched) for sched in schedules])
    positions = _stack_padded(schedules, -1)
    k, num_steps, batch = positions.shape
    index = positions.clamp(min=0).view(k, -1)
    rows = _stack_padded(list(shards), 0).gather(1, index).view(k, num_steps, batch)
    rows, valid = rows.transpose(0, 1), (positions >= 0).transpose(0, 1)
    row_bytes = k * batch * math.prod(x.shape[1:]) * x.element_size()
    window = max(1, GATHER_BYTES // max(1, row_bytes))
    for first in range(0, num_steps, window):
        part = slice(first, first + window)
        xs, ys = _gather(x, rows[part]), _gather(y, rows[part])
        masks = valid[part].to(x.dtype)
        weights = targets(ys, masks) if targets is not None else None
        for i in range(xs.shape[0]):
            # every scheduled batch holds a row: a client is active until its schedule ends
            yield LocalStep(
                x=xs[i],
                y=ys[i],
                mask=masks[i],
                active=first + i < lengths,
                targets=None if weights is None else weights[i],
            )


def poisson_steps(
    x: torch.Tensor,
    y: torch.Tensor,
    shards: Sequence[torch.Tensor],
    num_steps: Sequence[int],
    gens: Sequence[torch.Generator],
    *,
    sample_rate: float,
) -> Iterator[LocalStep]:
    """Poisson-sampled batches (DP-SGD), padded to the largest of each step.

    Each active client draws ``rand(n_k) < sample_rate`` from its generator at every
    step, before anything else of that step; ``num_steps`` gives each client's steps.
    """
    device = x.device
    lengths = torch.tensor(list(num_steps))
    for step in range(int(lengths.max())):
        active = step < lengths
        chosen = [
            rows[torch.rand(len(rows), generator=g, device=device) < sample_rate]
            if on
            else rows[:0]
            for rows, g, on in zip(shards, gens, active.tolist(), strict=True)
        ]
        width = max(1, *(len(c) for c in chosen))
        batch_rows = torch.zeros(len(shards), width, dtype=torch.long, device=device)
        mask = torch.zeros(batch_rows.shape, dtype=x.dtype, device=device)
        for i, c in enumerate(chosen):
            batch_rows[i, : len(c)] = c
            mask[i, : len(c)] = 1.0
        yield LocalStep(x=x[batch_rows], y=y[batch_rows], mask=mask, active=active)


def _gather(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``values[rows]``, contiguous; ``index_select`` is several times faster on CPU."""
    return values.index_select(0, rows.reshape(-1)).view(*rows.shape, *values.shape[1:])


def _stack_padded(tensors: list[torch.Tensor], fill: int) -> torch.Tensor:
    """Stacks ``tensors`` padded along their first dimension with ``fill``."""
    if len({t.shape for t in tensors}) == 1:  # the common case, and a cheaper call
        return torch.stack(tensors)
    return pad_sequence(tensors, batch_first=True, padding_value=fill)
