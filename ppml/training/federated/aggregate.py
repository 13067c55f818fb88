"""Aggregation as pure tensor functions over flat parameter vectors.

Client updates arrive as matrices ``(k, P)``: row ``i`` is a client's delta
``w_i - w_global`` over all ``P`` model parameters, flattened in module order. A round
folds them chunk by chunk into a ``PartialSum`` (so it never holds every client's
delta at once) and finishes with a server step. Nothing here keeps state; the
strategies own it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "CLIP_EPSILON",
    "AdamState",
    "PartialSum",
    "adam_server_step",
    "add_gaussian_noise",
    "add_weighted",
    "apply_delta",
    "clip_rows",
    "mean_of",
    "weighted_mean",
]

# Opacus' guard against a zero norm; it also keeps a clipped row strictly inside the ball.
CLIP_EPSILON = 1e-6


@dataclass(frozen=True)
class PartialSum:
    """A running weighted sum of client deltas, so a round can aggregate chunk by chunk.

    Attributes:
        total: ``Σ_k w_k u_k`` over the clients seen so far ``(P,)``.
        weight: ``Σ_k w_k`` (a 0-d tensor, on the deltas' device).
        count: Number of clients summed.
    """

    total: torch.Tensor
    weight: torch.Tensor
    count: int


def add_weighted(
    partial: PartialSum | None, updates: torch.Tensor, weights: torch.Tensor
) -> PartialSum:
    """Adds a chunk of weighted deltas to a running sum (None: start a new one).

    Args:
        partial: The sum so far, or None.
        updates: Client deltas ``(k, P)``; ``k`` may be zero.
        weights: Non-negative weights ``(k,)``.

    Returns:
        The new running sum (``partial`` is not modified).
    """
    if updates.ndim != 2 or weights.shape != updates.shape[:1]:
        raise ValueError("expected updates (k, P) and weights (k,)")
    w = weights.to(device=updates.device, dtype=updates.dtype)
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    total, weight = w @ updates, w.sum()
    if partial is None:
        return PartialSum(total, weight, len(updates))
    return PartialSum(partial.total + total, partial.weight + weight, partial.count + len(updates))


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Returns ``Σ_k w_k u_k / Σ_k w_k``.

    Args:
        updates: Client deltas ``(K, P)``, ``K ≥ 1``.
        weights: Non-negative weights ``(K,)`` with a positive sum.

    Returns:
        The weighted mean delta ``(P,)``.
    """
    return mean_of(add_weighted(None, updates, weights))


def mean_of(partial: PartialSum) -> torch.Tensor:
    """The weighted mean a running sum stands for; its weights must sum to > 0."""
    if not partial.weight > 0:
        raise ValueError("weights must have a positive sum")
    return partial.total / partial.weight


def clip_rows(updates: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scales each row to L2 norm at most ``clip_norm`` (rows inside the ball are kept).

    Args:
        updates: Client deltas ``(K, P)``.
        clip_norm: The bound ``C > 0``.

    Returns:
        The clipped deltas ``(K, P)``.
    """
    norms: torch.Tensor = torch.linalg.vector_norm(updates, dim=1)
    factors = (clip_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
    return updates * factors[:, None]


def add_gaussian_noise(total: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Returns ``total + N(0, std²)`` per coordinate.

    Args:
        total: A summed delta ``(P,)`` (zeros when no client reported).
        std: Noise standard deviation (``σ·C`` for DP-FedAvg).
        generator: Source of the noise; on the same device as ``total``.

    Returns:
        The noised sum ``(P,)``.
    """
    noise = torch.randn(total.shape, generator=generator, device=total.device, dtype=total.dtype)
    return total + std * noise


def apply_delta(params: torch.Tensor, delta: torch.Tensor, learning_rate: float) -> torch.Tensor:
    """The FedAvg server step ``w + η Δ``."""
    return params + learning_rate * delta


@dataclass(frozen=True)
class AdamState:
    """Server-side Adam moments (Reddi et al. 2021, no bias correction)."""

    m: torch.Tensor
    v: torch.Tensor

    @classmethod
    def zeros_like(cls, params: torch.Tensor) -> AdamState:
        return cls(torch.zeros_like(params), torch.zeros_like(params))


def adam_server_step(
    params: torch.Tensor,
    delta: torch.Tensor,
    state: AdamState,
    *,
    learning_rate: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[torch.Tensor, AdamState]:
    """FedAdam: Adam on the averaged delta treated as a pseudo-gradient step.

    ``m ← β1 m + (1−β1) Δ``, ``v ← β2 v + (1−β2) Δ²``, ``w ← w + η m / (√v + τ)``.

    Args:
        params: Global parameters ``(P,)``.
        delta: Averaged client delta ``(P,)``.
        state: Moments from the previous round.
        learning_rate: Server step size ``η``.
        beta1: First-moment decay.
        beta2: Second-moment decay.
        tau: Adaptivity ``τ`` (added to ``√v``).

    Returns:
        The new parameters and moments.
    """
    m = beta1 * state.m + (1 - beta1) * delta
    v = beta2 * state.v + (1 - beta2) * delta * delta
    return params + learning_rate * m / (v.sqrt() + tau), AdamState(m, v)
