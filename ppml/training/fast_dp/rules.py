"""Per-layer rules: per-sample gradient norms and clipped sums from one backward pass.

A rule sees, for every call of its module in the forward pass, the module's inputs and
the gradient of the summed loss with respect to its output (a ``Call``). From these it
computes

* ``norms(calls)``: vectors of shape ``(B,)`` whose squares add up to each sample's
  squared gradient norm over the module's parameters (norms rather than squares, so
  the engine combines all layers with one ``vector_norm``), and
* ``accumulate(scale, alpha, beta)``: ``grad = beta * grad + alpha * Σ_i scale_i ∇_i``
  in the parameters' slices of the engine's flat buffer, which holds the noise.

Linear layers and convolutions live in ``bilinear``; this module has the interface, the
normalisation and embedding layers, the Opacus fallback and the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from opacus import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["Buffers", "Call", "Materialised", "Rule", "join", "row_norms"]


class Call(NamedTuple):
    """One forward call of a module: its inputs and the gradient at its output."""

    inputs: tuple[Tensor, ...]
    grad_out: Tensor


def row_norms(x: Tensor) -> Tensor:
    """L2 norm of each row of a ``(B, n)`` tensor."""
    norms: Tensor = torch.linalg.vector_norm(x, dim=1)
    return norms


class Buffers:
    """Scratch tensors a rule reuses from one step to the next.

    A rule's per-step temporaries (patches, per-sample gradients) run to megabytes. glibc
    serves blocks above its mmap threshold (128 KiB, raised when such a block is freed)
    with freshly mapped pages that it unmaps on free, so depending on the process's
    allocation history a fresh allocation every step pays a page fault per page it
    writes. Reused buffers make the step's cost independent of that history: cnn2d on
    8x8 images, batch 256, one thread, interleaved in one process with a non-private
    step, went from 2.5x to 1.5x its time. What ``take`` returns is valid until the same
    name is taken again: within one step.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: Sequence[int], like: Tensor) -> Tensor:
        """A contiguous tensor of ``shape`` with ``like``'s dtype and device (uninitialised)."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.numel() < size
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = like.new_empty(size)
            self._buffers[name] = buffer
        return buffer[:size].view(*shape)


def join(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` that does not copy a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class Rule:
    """Norms and clipped sums for the parameters owned directly by one module.

    Args:
        module: The layer.
        grads: For each trainable parameter of the layer, its slice of the flat
            gradient buffer, shaped like the parameter.
    """

    def __init__(self, module: nn.Module, grads: dict[Tensor, Tensor]) -> None:
        self.module = module
        self.grads = grads

    def capture(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, ...]:
        """What to keep from a forward call (its inputs unless a rule wants more)."""
        del output
        return inputs

    def norms(self, calls: Sequence[Call]) -> list[Tensor]:
        """Per-sample norm pieces ``(B,)``; keeps what ``accumulate`` needs."""
        raise NotImplementedError

    def accumulate(self, scale: Tensor, alpha: float, beta: float) -> None:
        """Sets each slice to ``beta * slice + alpha * Σ_i scale_i ∇_i``, then forgets."""
        raise NotImplementedError


class Materialised(Rule):
    """Per-sample gradients formed explicitly, ``(B, numel)`` per parameter."""

    def __init__(self, module: nn.Module, grads: dict[Tensor, Tensor]) -> None:
        super().__init__(module, grads)
        self._samples: dict[Tensor, Tensor] = {}

    def per_sample(self, call: Call) -> dict[Tensor, Tensor]:
        """Per-sample gradients of one call, each ``(B, numel)``."""
        raise NotImplementedError

    def norms(self, calls: Sequence[Call]) -> list[Tensor]:
        samples = self.per_sample(calls[0])
        for call in calls[1:]:
            # a reused module: per-sample gradients add up before the norm is taken
            for param, grad in self.per_sample(call).items():
                samples[param] = samples[param] + grad
        self._samples = samples
        return [row_norms(grad) for grad in samples.values()]

    def accumulate(self, scale: Tensor, alpha: float, beta: float) -> None:
        for param, grad in self._samples.items():
            self.grads[param].view(-1).addmv_(grad.t(), scale, beta=beta, alpha=alpha)
        self._samples = {}


class EmbeddingRule(Rule):
    """``nn.Embedding``: always ghost, as a per-sample gradient would be ``V × D``.

    The squared norm is ``Σ_{t,s} [i_t = i_s] (g_t·g_s)``; the clipped sum is one
    ``index_add_``. Rows at ``padding_idx`` get no gradient, as in ``nn.Embedding``.
    """

    def __init__(self, module: nn.Module, grads: dict[Tensor, Tensor]) -> None:
        super().__init__(module, grads)
        assert isinstance(module, nn.Embedding)
        self.embedding = module
        self._weight = grads[module.weight]
        self._index, self._g = torch.empty(0), torch.empty(0)

    def norms(self, calls: Sequence[Call]) -> list[Tensor]:
        batch, width = calls[0].inputs[0].shape[0], self.embedding.embedding_dim
        index = join([c.inputs[0].reshape(batch, -1) for c in calls], 1)
        g = join([c.grad_out.reshape(batch, -1, width) for c in calls], 1)
        if self.embedding.padding_idx is not None:
            g = g.masked_fill((index == self.embedding.padding_idx).unsqueeze(2), 0.0)
        self._index, self._g = index, g
        if index.shape[1] == 1:
            return [row_norms(g.view(batch, width))]
        same = index.unsqueeze(2) == index.unsqueeze(1)
        gram = torch.bmm(g, g.transpose(1, 2)).masked_fill_(~same, 0.0)
        # a sum of squares up to rounding, which may dip below zero
        return [gram.view(batch, -1).sum(1).clamp_min_(0.0).sqrt_()]

    def accumulate(self, scale: Tensor, alpha: float, beta: float) -> None:
        rows = (self._g * scale.view(-1, 1, 1)).view(-1, self.embedding.embedding_dim)
        self._weight.mul_(beta).index_add_(0, self._index.reshape(-1), rows, alpha=alpha)
        self._index, self._g = torch.empty(0), torch.empty(0)


class GroupNormRule(Materialised):
    """``nn.GroupNorm`` affine parameters: per-sample ``(B, C)`` gradients.

    Folding the batch into the channels (one sample of ``B·C`` channels in ``B·G``
    groups) makes the fused group-norm backward return the per-sample sums of
    ``g · x̂`` and ``g`` in one pass over ``x`` and ``g``. Its mean and 1/std come from
    the forward pass (autograd saved them) rather than being computed again.
    """

    def capture(self, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, ...]:
        node: Any = output.grad_fn
        if type(node).__name__ != "NativeGroupNormBackward0":
            return inputs  # another kernel ran the forward: recompute the statistics
        try:  # it saved (mean, 1/std), each (B, G), as its results 1 and 2
            return (inputs[0], node._saved_result1, node._saved_result2)
        except (AttributeError, RuntimeError):
            return inputs

    def per_sample(self, call: Call) -> dict[Tensor, Tensor]:
        norm = self.module
        assert isinstance(norm, nn.GroupNorm)
        x, g = call.inputs[0], call.grad_out
        batch, channels = x.shape[0], norm.num_channels
        rows, groups = batch * channels, batch * norm.num_groups
        x = x.reshape(1, rows, -1)
        width = x.shape[2]
        if len(call.inputs) == 3:
            mean, rstd = call.inputs[1].reshape(1, -1), call.inputs[2].reshape(1, -1)
        else:
            _, mean, rstd = torch.native_group_norm(x, None, None, 1, rows, width, groups, norm.eps)
        gamma = x.new_ones(rows)  # the affine gradients do not depend on gamma
        mask = [False, True, norm.bias is not None]
        _, weight, bias = torch.ops.aten.native_group_norm_backward(
            g.reshape(1, rows, width), x, mean, rstd, gamma, 1, rows, width, groups, mask
        )
        grads: dict[Tensor, Tensor] = {norm.weight: weight.view(batch, channels)}
        if norm.bias is not None:
            grads[norm.bias] = bias.view(batch, channels)
        return grads


class LayerNormRule(Materialised):
    """``nn.LayerNorm`` affine parameters: per-sample gradients of the normalised shape."""

    def per_sample(self, call: Call) -> dict[Tensor, Tensor]:
        norm = self.module
        assert isinstance(norm, nn.LayerNorm)
        x, g = call.inputs[0], call.grad_out
        batch, width = x.shape[0], norm.weight.numel()
        x_hat = F.layer_norm(x, norm.normalized_shape, eps=norm.eps)
        grads: dict[Tensor, Tensor] = {norm.weight: (g * x_hat).reshape(batch, -1, width).sum(1)}
        if norm.bias is not None:
            grads[norm.bias] = g.reshape(batch, -1, width).sum(1)
        return grads


class OpacusRule(Materialised):
    """Any other layer: Opacus' per-sample gradient function, else its functorch path."""

    def per_sample(self, call: Call) -> dict[Tensor, Tensor]:
        sampler: Callable[..., dict[Tensor, Tensor]] = GradSampleModule.GRAD_SAMPLERS.get(
            type(self.module), ft_compute_per_sample_gradient
        )
        samples = sampler(self.module, list(call.inputs), call.grad_out)
        return {p: s.reshape(s.shape[0], -1) for p, s in samples.items() if p in self.grads}
