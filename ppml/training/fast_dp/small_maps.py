"""Convolutions on small maps: norms from the input's pixel Gram, no patch matrix.

A convolution's per-sample weight gradient is ``Σ_t g_t a_tᵀ`` over output positions
``t``, where the patch ``a_t`` stacks the input pixels ``x_{src(t, o)}`` over the kernel
offsets ``o``. Writing ``E_o`` for the ``T × U`` matrix that picks, for each output
position, the input pixel under offset ``o`` (a zero row where the offset falls on
padding), the patch Gram is ``A = Σ_o E_o P E_oᵀ`` with ``P = XᵀX`` the ``U × U`` Gram of
the input pixels (over channels). So the ghost norm ``‖∇‖² = Σ_{t,s} A_{ts} (g_t·g_s)``
needs only ``P`` and one fixed linear map ``M: P ↦ A`` of ``U²`` by ``T²`` entries, applied
to the whole batch in one matrix product.

The clipped sum ``Σ_i c_i ∇_i`` is the batch contraction ``Q = Σ_i c_i g_i ⊗ x_i`` (one
``(K·T) × B`` by ``B × (C·U)`` product) folded by the same selection into the weight's
``(K, C, ∏kernel)``.

On maps of a few positions (a 4×4 map after two poolings of an 8×8 image) both are a
handful of well-shaped matrix products, where per-sample gradients need a strided patch
copy and a batch of ``K × T`` by ``T × d`` products. Measured at batch 256, one thread,
16→32 channels on 4×4 positions (norms and clipped sum, alone): 3×3 kernel 3.8 ms by
patches vs 1.6 ms here; 5×5 kernel 11.4 ms vs 1.6 ms. ``M`` grows as ``U²T²``, so the rule
applies to small maps only.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MAX_POSITION_PAIRS", "PixelGram", "fits"]

ConvNd = nn.Conv1d | nn.Conv2d

# U·T at most this (input pixels times output positions): M then has at most 65,536
# entries (a 4×4 map in, 4×4 out; a 1-D signal of 16). Beyond, M's product costs more per
# sample than the patch route (U²T² against T·d·k), and its size grows as the square.
MAX_POSITION_PAIRS = 256


def _geometry(conv: ConvNd) -> tuple[tuple[int, ...], ...]:
    """What the selection depends on besides the input size (hashable, for the cache)."""
    return (
        tuple(conv.kernel_size),
        tuple(conv.stride),
        tuple(conv.dilation),
    )


class _Selection(NamedTuple):
    """The fixed linear maps of one convolution geometry on one input size."""

    m: Tensor  # P's upper triangle -> the patch Gram's, weighted for symmetry
    pixel_pairs: Tensor  # where P's upper triangle sits in the flat U x U Gram
    position_pairs: Tensor  # where the output Gram's upper triangle sits in T x T
    s_t: Tensor  # (∏kernel, T·U): which (position, pixel) pairs each kernel offset joins


@lru_cache(maxsize=64)
def _selection(
    spatial: tuple[int, ...],
    padding: tuple[int, ...],
    geometry: tuple[tuple[int, ...], ...],
    dtype: torch.dtype,
    device: torch.device,
) -> _Selection:
    """The maps for one geometry and input size, on ``device`` in ``dtype``.

    The pixel under each (offset, output position) is found by unfolding an image of pixel
    numbers the way the convolution unfolds its input: 0 where the offset falls on padding.
    """
    kernel, stride, dilation = geometry
    pixels = math.prod(spatial)
    ids = torch.arange(1, pixels + 1, dtype=torch.float64).view(1, 1, *spatial)
    if any(padding):
        ids = F.pad(ids, [p for p in reversed(padding) for _ in range(2)])
    for i, (size, step, dil) in enumerate(zip(kernel, stride, dilation, strict=True)):
        ids = ids.unfold(2 + i, dil * (size - 1) + 1, step)
        if dil > 1:
            ids = ids[..., ::dil]
    # (1, 1, T_1.., k_1..) -> (offsets, T)
    offsets = math.prod(kernel)
    source = ids.reshape(-1, offsets).t().long()
    positions = source.shape[1]
    # E[o, t, u] = 1 where offset o of output position t reads input pixel u
    e = torch.zeros(offsets, positions, pixels + 1, dtype=torch.float64)
    e.scatter_(2, source.unsqueeze(2), 1.0)
    e = e[:, :, 1:]  # column 0 collected the padding
    m = torch.einsum("otu,osv->uvts", e, e)
    # Both Grams are symmetric: keep their upper triangles, a pair off the diagonal
    # standing for both of its orders (P's in M's rows, the output Gram's in its columns).
    us, vs = torch.triu_indices(pixels, pixels)
    ts, ss = torch.triu_indices(positions, positions)
    m = m[us, vs] + torch.where((us != vs).view(-1, 1, 1), m[vs, us], 0.0)
    m = m[:, ts, ss] * torch.where(ts != ss, 2.0, 1.0)
    return _Selection(
        m.to(device, dtype).contiguous(),
        (us * pixels + vs).to(device),
        (ts * positions + ss).to(device),
        e.reshape(offsets, positions * pixels).to(device, dtype).contiguous(),
    )


def fits(conv: ConvNd, pixels: int, positions: int) -> bool:
    """Whether this rule applies: one group and few enough (pixel, position) pairs."""
    return conv.groups == 1 and pixels * positions <= MAX_POSITION_PAIRS


class PixelGram:
    """Norms and clipped sum of one convolution call's weight gradient, by pixel Grams.

    Args:
        x: The input as the convolution pads it outside its own zero padding
            (``bilinear._conv_input``), ``(B, C, *spatial)``.
        padding: The zero padding still to apply, per spatial dimension.
        g: Output gradients ``(B, K, T)``.
        conv: The convolution (its kernel, stride, dilation; one group).
    """

    def __init__(self, x: Tensor, padding: list[int], g: Tensor, conv: ConvNd) -> None:
        spatial = tuple(x.shape[2:])
        self._maps = _selection(spatial, tuple(padding), _geometry(conv), x.dtype, x.device)
        self._x = x.reshape(x.shape[0], x.shape[1], -1)  # (B, C, U)
        self._g = g

    def norm(self) -> Tensor:
        batch, maps = self._x.shape[0], self._maps
        pixels = torch.bmm(self._x.transpose(1, 2), self._x).view(batch, -1)  # (B, U²)
        # the patch Gram's upper triangle, per sample
        patches = pixels.index_select(1, maps.pixel_pairs) @ maps.m
        outputs = torch.bmm(self._g.transpose(1, 2), self._g).view(batch, -1)
        outputs = outputs.index_select(1, maps.position_pairs)
        # a sum of squares up to rounding, which may dip below zero
        squares: Tensor = torch.linalg.vecdot(patches, outputs)
        return squares.clamp_min_(0.0).sqrt_()

    def accumulate(self, weight: Tensor, scale: Tensor, alpha: float, beta: float) -> None:
        x, g = self._x, self._g
        batch, channels, pixels = x.shape
        out_channels, positions = g.shape[1], g.shape[2]
        # scale whichever side is smaller, then Q = Σ_i c_i g_i ⊗ x_i in one product
        if channels * pixels <= out_channels * positions:
            x = x * scale.view(-1, 1, 1)
        else:
            g = g * scale.view(-1, 1, 1)
        q = g.reshape(batch, -1).t() @ x.reshape(batch, -1)  # (K·T, C·U)
        q = q.view(out_channels, positions, channels, pixels).transpose(1, 2)
        folded = q.reshape(out_channels * channels, positions * pixels)
        # (∏kernel, K·C): the selection on the left, where the product is well shaped
        update = torch.mm(self._maps.s_t, folded.t())
        weight.view(out_channels * channels, -1).mul_(beta).add_(update.t(), alpha=alpha)
