"""Training checkpoints: the state a re-run job resumes from.

Training writes a checkpoint at every progress report, *before* the report, so the job
row never claims more steps than the newest checkpoint holds. A checkpoint holds the
model, the optimiser (or server optimiser) state, the steps (and rounds) done and, for
federated jobs, the per-round metrics so far.

It never holds the secret randomness of a private job (the Poisson masks' and the
noise's generator, the federated base seed): a resumed run draws fresh secret
randomness, which is the same mechanism step for step, so the accounting is unchanged,
and a stolen checkpoint reveals nothing that could undo the noise. Everything in it is a
function of already-noised updates (post-processing). Non-private jobs are fully
seeded, so a resumed non-private job ends with exactly the weights of an uninterrupted
run (tested).

Files are read with ``torch.load(weights_only=True)`` only, and only files the worker
wrote itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT",
    "CheckpointSink",
    "load_checkpoint",
    "save_checkpoint",
    "snapshot",
    "start_of",
]

FORMAT = "ppml-checkpoint-v1"

#: Receives a checkpoint's state (a snapshot it may keep); the caller decides where it goes.
CheckpointSink = Callable[[dict[str, Any]], None]


def snapshot(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``state`` with every tensor cloned to the CPU (training goes on in place)."""
    return {key: _to_cpu(value) for key, value in state.items()}


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (tensors moved to the CPU) to ``path``."""
    torch.save({"format": FORMAT, **snapshot(state)}, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        ValueError: If the file is not a ppml checkpoint.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError("not a ppml checkpoint")
    return state


def start_of(resume: Mapping[str, Any] | None, *, kind: str, key: str, limit: int) -> int:
    """Where a resumed run starts (``resume[key]``), after checking the state's kind.

    Raises:
        ValueError: If the state belongs to another kind of training or lies past ``limit``.
    """
    if resume is None:
        return 0
    if resume.get("kind") != kind:
        raise ValueError(f"checkpoint is not a {kind} checkpoint")
    start = resume.get(key)
    if not isinstance(start, int) or not 0 <= start <= limit:
        raise ValueError(f"checkpoint {key} out of range")
    return start


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value
