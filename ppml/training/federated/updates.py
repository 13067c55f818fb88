"""What travels between the server loop and the nodes: the global weights as safetensors,
and the checks every node's update must pass before it is aggregated (names, shapes,
float32, finite values, a norm bound: client level ``C``; sample level a generous bound on
what honest local DP-SGD can reach)."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ppml.training.federated.functional import ParamLayout

__all__ = ["check_update", "client_norm_bound", "sample_norm_bound", "weights_bytes"]


def weights_bytes(layout: ParamLayout, params: torch.Tensor, round_index: int) -> bytes:
    """The global parameters as safetensors (float32, the module's parameter names)."""
    tensors = {
        k: v.detach().float().cpu().contiguous() for k, v in layout.unflatten(params).items()
    }
    return save_tensors(tensors, metadata={"round": str(round_index)})


def check_update(layout: ParamLayout, blob: bytes, norm_bound: float | None) -> torch.Tensor:
    """An update as a flat ``(P,)`` vector, or ValueError saying what is wrong with it."""
    try:
        tensors = load_tensors(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"not a safetensors file: {exc}") from None
    expected = dict(zip(layout.names, layout.shapes, strict=True))
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"wrong tensors: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        tensor = tensors[name]
        if tensor.dtype != torch.float32 or tensor.shape != shape:
            raise ValueError(
                f"{name}: expected float32 {list(shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
    flat = layout.flatten(tensors)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("the update holds NaN or infinite values")
    norm = float(flat.norm())
    if norm_bound is not None and norm > norm_bound:
        raise ValueError(f"update norm {norm:.4g} exceeds the bound {norm_bound:.4g}")
    return flat


def client_norm_bound(clip_norm: float) -> float:
    """Client level: nodes clip to ``C``; a little slack for float rounding."""
    return clip_norm * (1 + 1e-3)


def sample_norm_bound(
    *,
    learning_rate: float,
    momentum: float,
    steps: int,
    clip_norm: float,
    sigma: float,
    expected_batch: float,
    num_params: int,
) -> float:
    """Sample level: ten times the largest norm honest local DP-SGD can plausibly reach
    (every step's clipped mean plus its noise, amplified by momentum)."""
    per_step = clip_norm + sigma * clip_norm * math.sqrt(num_params) / max(expected_batch, 1.0)
    return 10 * learning_rate / max(1 - momentum, 1e-3) * steps * per_step
