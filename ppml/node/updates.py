"""What crosses the wire besides JSON: the global weights in, the node's update out.

Both are safetensors of float32 tensors keyed by the model's ``state_dict`` names. The update
is ``local − global``; its ``__metadata__`` holds the ε this round charged on the node's ledger
and the node's total for the job so far (sample level), as strings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ppml.errors import InvalidInput

__all__ = ["decode_weights", "encode_update", "sha256_hex"]


def sha256_hex(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def decode_weights(
    body: bytes, *, expected: Mapping[str, torch.Size], sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """The global weights of a task, checked against the model the task names.

    Raises:
        InvalidInput: a digest other than the task's, or keys, shapes or dtypes other than
            the model's, or non-finite values.
    """
    if sha256 is not None and sha256_hex(body) != sha256.lower():
        raise InvalidInput("the global weights do not match the task's weights_sha256")
    try:
        tensors = load(body)
    except (SafetensorError, ValueError, RuntimeError):
        raise InvalidInput("the global weights are not a valid safetensors file") from None
    if set(tensors) != set(expected):
        raise InvalidInput("the global weights' names differ from the task's model")
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32 or tensor.shape != expected[name]:
            raise InvalidInput(f"the global weight {name!r} has the wrong dtype or shape")
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidInput(f"the global weight {name!r} holds non-finite values")
    return tensors


def encode_update(
    update: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The update as float32 safetensors with string ``metadata``."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in update.items()}
    return save(tensors, metadata=dict(metadata or {}))
