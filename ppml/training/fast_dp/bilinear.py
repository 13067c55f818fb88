"""Linear layers and convolutions: ghost norm or per-sample gradients, chosen by cost.

Their weights have per-sample gradients ``Σ_t g_t a_tᵀ`` over positions ``t`` (one for a
plain ``(B, d)`` linear input; the patches of a convolution). The squared norm can be
taken from the activations and output gradients without forming the gradient ("ghost
norm", Goodfellow 2015; Li et al. 2022): ``Σ_{t,s} (a_t·a_s)(g_t·g_s)``, at a cost of
``T²(d+k)`` per sample; or from the materialised per-sample gradient, ``T·d·k`` per
sample and ``B·d·k`` memory. The cheaper one is chosen per layer and input shape (the
mixed strategy of Bu et al. 2023). The clipped sum is then one weighted product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ppml.training.fast_dp import small_maps
from ppml.training.fast_dp.rules import Buffers, Call, Rule, join, row_norms

__all__ = ["ConvRule", "LinearRule", "prefer_ghost"]

ConvNd = nn.Conv1d | nn.Conv2d

# Per-sample convolution gradients come from the convolution's own weight-gradient
# kernel (batch folded into groups) from this many output positions on, and for patches
# of at least this many values. Below either the kernel's per-group overhead dominates on
# CPU (oneDNN) and patches times output gradients in one batched product win. Measured at
# batch 256, one thread: 16->32 channels on 20 positions, 2.1 ms by patches vs 5.4 ms
# grouped; on 14x14 positions, 12 ms by patches vs 7 ms grouped; a 3x3 conv of 1 channel
# (9 values a patch) on 8x8 and 28x28 positions, 0.4 and 4.1 ms by patches vs 0.5 and
# 4.8 ms grouped.
GROUPED_MIN_POSITIONS = 64
GROUPED_MIN_WIDTH = 32

# 2-D patches are built channel-minor (offsets, then channels) from this many input
# channels on: the copy then moves runs of C contiguous values of a channels-last view
# rather than runs of one output row, which on small maps are a few values long.
# Measured at batch 256, one thread: 16 channels on 4x4, 0.7 ms vs 1.45 ms; 32 channels
# on 7x7, 3.6 ms vs 4.0 ms; 1 channel on 8x8, 0.46 ms vs 0.14 ms.
CHANNEL_MINOR_MIN_CHANNELS = 16


def prefer_ghost(positions: int, d: int, k: int) -> bool:
    """Whether the ghost norm is cheaper than materialising a ``k × d`` gradient.

    Ghost: ``T²(d+k)`` for the two Gram matrices (the clipped sum, ``T·d·k``, is paid
    either way). Materialised: ``T·d·k`` for the gradient and ``2·d·k`` for its norm
    and the weighted sum, so ghost wins iff ``T²(d+k) < 2·d·k``.
    """
    return positions * positions * (d + k) < 2 * d * k


class _Bilinear:
    """Weight gradient ``Σ_t g_t a_tᵀ`` per sample, in ``groups`` independent blocks.

    Args:
        a: Activations ``(B, T, groups·d)`` (any strides).
        g: Output gradients ``(B, T, groups·k)``.
        groups: Channel groups (convolutions); 1 for linear layers.
        ghost: Ghost norm, or per-sample gradients by batched products.
        buffers: Where per-sample gradients are written, or None for a fresh tensor.
    """

    def __init__(
        self, a: Tensor, g: Tensor, groups: int, ghost: bool, buffers: Buffers | None = None
    ) -> None:
        batch, positions = a.shape[:2]
        d, k = a.shape[2] // groups, g.shape[2] // groups
        if groups > 1:
            # (B, T, G·d) -> (B·G, T, d): one batched product per sample and group
            a = a.reshape(batch, positions, groups, d).transpose(1, 2).reshape(-1, positions, d)
            g = g.reshape(batch, positions, groups, k).transpose(1, 2).reshape(-1, positions, k)
        self.a, self.g, self.groups, self.batch, self.ghost = a, g, groups, batch, ghost
        self.buffers = buffers
        self.samples: Tensor | None = None

    def norm(self) -> Tensor:
        if self.ghost:
            gram_a = torch.bmm(self.a, self.a.transpose(1, 2)).view(self.batch, -1)
            gram_g = torch.bmm(self.g, self.g.transpose(1, 2)).view(self.batch, -1)
            # a sum of squares up to rounding, which may dip below zero
            squares: Tensor = torch.linalg.vecdot(gram_a, gram_g)
            return squares.clamp_min_(0.0).sqrt_()
        g_t = self.g.transpose(1, 2)
        shape = (g_t.shape[0], g_t.shape[1], self.a.shape[2])
        out = None if self.buffers is None else self.buffers.take("samples", shape, self.a)
        self.samples = torch.bmm(g_t, self.a, out=out).view(self.batch, -1)
        return row_norms(self.samples)

    def accumulate(self, weight: Tensor, scale: Tensor, alpha: float, beta: float) -> None:
        if self.samples is not None:
            weight.view(-1).addmv_(self.samples.t(), scale, beta=beta, alpha=alpha)
            return
        groups, positions = self.groups, self.a.shape[1]
        per_row = scale.repeat_interleave(groups) if groups > 1 else scale
        g = (self.g * per_row.view(-1, 1, 1)).reshape(self.batch, groups, positions, -1)
        a = self.a.reshape(self.batch, groups, positions, -1)
        # (G, B·T, ·): one product per group over all samples and positions
        g = g.transpose(0, 1).reshape(groups, self.batch * positions, -1)
        a = a.transpose(0, 1).reshape(groups, self.batch * positions, -1)
        grouped = weight.view(groups, g.shape[2], a.shape[2])
        grouped.baddbmm_(g.transpose(1, 2), a, beta=beta, alpha=alpha)


class LinearRule(Rule):
    """``nn.Linear``: ghost norm for ``(B, d)`` inputs, the mixed strategy otherwise."""

    def __init__(self, module: nn.Module, grads: dict[Tensor, Tensor]) -> None:
        super().__init__(module, grads)
        assert isinstance(module, nn.Linear)
        self._weight = grads[module.weight]
        self._bias = None if module.bias is None else grads[module.bias]
        self._a: Tensor | None = None
        self._g = torch.empty(0)
        self._bilinear: _Bilinear | None = None

    def norms(self, calls: Sequence[Call]) -> list[Tensor]:
        a, g = calls[0].inputs[0], calls[0].grad_out
        if len(calls) == 1 and a.dim() == 2:
            # ‖g aᵀ‖ = ‖g‖‖a‖, and the bias gradient is g itself
            self._a, self._g = a, g
            g_norm = row_norms(g)
            weight = g_norm * row_norms(a)
            return [weight] if self._bias is None else [weight, g_norm]
        batch = a.shape[0]
        # more positions, or a module called several times: each call adds positions
        a = join([c.inputs[0].reshape(batch, -1, a.shape[-1]) for c in calls], 1)
        g = join([c.grad_out.reshape(batch, -1, g.shape[-1]) for c in calls], 1)
        self._bilinear = _Bilinear(a, g, 1, prefer_ghost(a.shape[1], a.shape[2], g.shape[2]))
        if self._bias is None:
            return [self._bilinear.norm()]
        self._g = g.sum(1)
        return [self._bilinear.norm(), row_norms(self._g)]

    def accumulate(self, scale: Tensor, alpha: float, beta: float) -> None:
        if self._a is not None:
            a, g, col = self._a, self._g, scale.unsqueeze(1)
            # scale whichever side is narrower, then one product
            if a.shape[1] < g.shape[1]:
                self._weight.addmm_(g.t(), a * col, beta=beta, alpha=alpha)
            else:
                self._weight.addmm_((g * col).t(), a, beta=beta, alpha=alpha)
        else:
            assert self._bilinear is not None
            self._bilinear.accumulate(self._weight, scale, alpha, beta)
        if self._bias is not None:
            self._bias.addmv_(self._g.t(), scale, beta=beta, alpha=alpha)
        self._a, self._g, self._bilinear = None, torch.empty(0), None


def _conv_input(conv: ConvNd, x: Tensor) -> tuple[Tensor, list[int]]:
    """``x`` padded as ``conv`` pads it, and the padding still to apply symmetrically."""
    reversed_pads = list(conv._reversed_padding_repeated_twice)
    lefts, rights = reversed_pads[-2::-2], reversed_pads[::-2]
    if conv.padding_mode == "zeros" and lefts == rights:
        return x, lefts
    # what Conv._conv_forward does for other modes; also an asymmetric "same"
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, reversed_pads, mode=mode), [0] * len(lefts)


def _materialise(view: Tensor, buffers: Buffers | None) -> Tensor:
    """``view`` copied once into a contiguous tensor (a reused one with ``buffers``)."""
    if buffers is None:
        return view.contiguous()
    return buffers.take("patches", view.shape, view).copy_(view)


def _unfold(conv: ConvNd, x: Tensor, buffers: Buffers | None = None) -> Tensor:
    """Patches of ``x``, ``(B, C_in·∏kernel, positions)``, as ``conv`` sees them.

    Strided windows (``Tensor.unfold``) and one copy: several times faster on CPU
    than ``F.unfold``, which loops over the samples.
    """
    x, padding = _conv_input(conv, x)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    batch, dims = x.shape[0], x.dim() - 2
    for i, (size, step, dilation) in enumerate(
        zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)
    ):
        x = x.unfold(2 + i, dilation * (size - 1) + 1, step)
        if dilation > 1:
            x = x[..., ::dilation]
    # (B, C, T_1.., k_1..) -> (B, C, k_1.., T_1..): channel-major, like the weight. The
    # copy is explicit: a reshape could return a view whose windows overlap in memory,
    # which batched matrix products then copy once per sample.
    order = [0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims)]
    patches = _materialise(x.permute(order), buffers)
    return patches.view(batch, conv.in_channels * math.prod(conv.kernel_size), -1)


def _channel_minor(conv: ConvNd) -> bool:
    """Whether ``conv``'s patches are built channel-minor (:func:`_unfold_channel_minor`)."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.groups == 1
        and conv.in_channels >= CHANNEL_MINOR_MIN_CHANNELS
    )


def _unfold_channel_minor(conv: nn.Conv2d, x: Tensor, buffers: Buffers | None = None) -> Tensor:
    """Patches of ``x``, ``(B, positions, kh·kw·C_in)``: offset-major, channel-minor.

    The same values as :func:`_unfold` in another order; the weight's gradient in this
    order is the weight permuted to ``(C_out, kh, kw, C_in)``.
    """
    x, padding = _conv_input(conv, x)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    x = x.permute(0, 2, 3, 1)  # (B, H, W, C): channels innermost
    for i, (size, step, dilation) in enumerate(
        zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)
    ):
        x = x.unfold(1 + i, dilation * (size - 1) + 1, step)
        if dilation > 1:
            x = x[..., ::dilation]
    # (B, H', W', C, kh, kw) -> (B, H', W', kh, kw, C), copied once (see _unfold)
    patches = _materialise(x.permute(0, 1, 2, 4, 5, 3), buffers)
    return patches.view(x.shape[0], x.shape[1] * x.shape[2], -1)


def _conv_per_sample(conv: ConvNd, x: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients ``(B, numel)`` from the convolution's own kernel.

    With the batch folded into the channels and ``B × groups`` groups, the weight
    gradient of that one grouped convolution is the stack of per-sample gradients
    (Rochette et al. 2019), and no patch matrix is built.
    """
    x, padding = _conv_input(conv, x)
    batch, shape = x.shape[0], conv.weight.shape
    folded: Tensor = torch.ops.aten.convolution_backward(
        g.reshape(1, -1, *g.shape[2:]),
        x.reshape(1, -1, *x.shape[2:]),
        # only its shape matters: the weight gradient does not depend on the weight
        conv.weight.new_empty(batch * shape[0], *shape[1:]),
        None,
        list(conv.stride),
        padding,
        list(conv.dilation),
        False,
        [0] * len(padding),
        batch * conv.groups,
        [False, True, False],
    )[1]
    return folded.view(batch, -1)


class ConvRule(Rule):
    """``nn.Conv1d`` / ``nn.Conv2d``: ghost norm on patches, or per-sample gradients."""

    def __init__(self, module: nn.Module, grads: dict[Tensor, Tensor]) -> None:
        super().__init__(module, grads)
        assert isinstance(module, nn.Conv1d | nn.Conv2d)
        self.conv: ConvNd = module
        self._weight = grads[module.weight]
        self._bias = None if module.bias is None else grads[module.bias]
        self._bilinear: _Bilinear | None = None
        self._pixel_gram: small_maps.PixelGram | None = None
        self._samples = torch.empty(0)
        self._bias_samples = torch.empty(0)
        self._channel_minor = False
        self._buffers = Buffers()

    def norms(self, calls: Sequence[Call]) -> list[Tensor]:
        conv = self.conv
        batch = calls[0].grad_out.shape[0]
        # (B, k, T); several calls of the module are more positions
        g = join([c.grad_out.reshape(batch, conv.out_channels, -1) for c in calls], 2)
        positions, k = g.shape[2], conv.out_channels // conv.groups
        d = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
        ghost = prefer_ghost(positions, d, k)
        self._channel_minor = False
        self._pixel_gram = self._small_map(calls, g)
        if self._pixel_gram is not None:
            norms = [self._pixel_gram.norm()]
        elif ghost or positions < GROUPED_MIN_POSITIONS or d < GROUPED_MIN_WIDTH:
            self._channel_minor = _channel_minor(conv)
            # one buffer of patches: a module called several times joins fresh ones
            buffers = self._buffers if len(calls) == 1 else None
            if self._channel_minor:
                assert isinstance(conv, nn.Conv2d)
                a = join([_unfold_channel_minor(conv, c.inputs[0], buffers) for c in calls], 1)
            else:
                a = join([_unfold(conv, c.inputs[0], buffers) for c in calls], 2).transpose(1, 2)
            self._bilinear = _Bilinear(a, g.transpose(1, 2), conv.groups, ghost, self._buffers)
            norms = [self._bilinear.norm()]
        else:
            samples = [_conv_per_sample(conv, c.inputs[0], c.grad_out) for c in calls]
            self._samples = samples[0] if len(samples) == 1 else torch.stack(samples).sum(0)
            norms = [row_norms(self._samples)]
        if self._bias is not None:
            self._bias_samples = g.sum(2)
            norms.append(row_norms(self._bias_samples))
        return norms

    def _small_map(self, calls: Sequence[Call], g: Tensor) -> small_maps.PixelGram | None:
        """The pixel-Gram route for one call on a small map, else None."""
        conv, x = self.conv, calls[0].inputs[0]
        # padding only adds pixels: the unpadded count rules most maps out unpadded
        if len(calls) > 1 or not small_maps.fits(conv, math.prod(x.shape[2:]), g.shape[2]):
            return None
        x, padding = _conv_input(conv, x)
        if not small_maps.fits(conv, math.prod(x.shape[2:]), g.shape[2]):
            return None
        return small_maps.PixelGram(x, padding, g, conv)

    def accumulate(self, scale: Tensor, alpha: float, beta: float) -> None:
        if self._pixel_gram is not None:
            self._pixel_gram.accumulate(self._weight, scale, alpha, beta)
        elif self._bilinear is not None and self._channel_minor:
            # the clipped sum in (C_out, kh, kw, C_in) order, then into the weight's order
            out_channels, in_channels, height, width = self._weight.shape
            update = self._weight.new_empty(out_channels, height, width, in_channels)
            self._bilinear.accumulate(update, scale, alpha, 0.0)
            self._weight.mul_(beta).add_(update.permute(0, 3, 1, 2))
        elif self._bilinear is not None:
            self._bilinear.accumulate(self._weight, scale, alpha, beta)
        else:
            self._weight.view(-1).addmv_(self._samples.t(), scale, beta=beta, alpha=alpha)
        if self._bias is not None:
            self._bias.addmv_(self._bias_samples.t(), scale, beta=beta, alpha=alpha)
        self._bilinear, self._pixel_gram = None, None
        self._samples, self._bias_samples = torch.empty(0), torch.empty(0)
