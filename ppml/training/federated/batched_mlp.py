"""Hand-written forward and backward of Linear/ReLU stacks on stacked client weights.

The generic vectorised path (``vmap(grad(functional_call(...)))``) costs about as much
per client step on CPU as a centralised step: ``torch.func`` adds milliseconds of
dispatch per call and copies batched weights. ``logreg`` and ``mlp`` are plain
``Linear``/``ReLU`` stacks, so their masked mean cross-entropy gradient is a few
``bmm`` calls, and plain SGD can fold the weight update into the gradient product
(``W.baddbmm_(δᵀ, h, alpha=-lr)``) without ever materialising the gradient. The
result equals autograd's to float rounding; the tests compare both against the
one-client-at-a-time ``torch.optim`` loop.

A local step is a few dozen small kernels, so per-call costs count: activations go
into preallocated buffers (``out=``), the loss weights come precomputed as
``Targets`` (one call for all steps of a chunk), the ReLU derivative is one
``threshold_backward`` and a bias update is one ``baddbmm_`` against a row of ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["BatchedMLP", "Targets"]

# Called per layer, from the top, with (layer index, dLoss/d layer output, layer input).
_Visit = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Targets:
    """The masked mean cross-entropy's weights for a batch ``(..., k, B)``.

    Attributes:
        scale: ``mask / rows in the batch``, ``(..., k, B, 1)``; 0 for padding.
        target: The one-hot labels times ``scale``, ``(..., k, B, classes)``.
    """

    scale: torch.Tensor
    target: torch.Tensor

    def __getitem__(self, index: int) -> Targets:
        """The targets of one step of a stack of steps (leading dimension)."""
        return Targets(self.scale[index], self.target[index])


def _relu_backward_(grad: torch.Tensor, relu_out: torch.Tensor) -> None:
    """Zeroes ``grad`` where the ReLU was off, in place, in one kernel."""
    torch.ops.aten.threshold_backward.grad_input(grad, relu_out, 0.0, grad_input=grad)


class _Workspace:
    """Activation and back-propagated gradient buffers for up to ``k`` clients."""

    def __init__(self, widths: tuple[int, ...], k: int, like: torch.Tensor) -> None:
        batch = like.shape[-2]
        self.key = (k, batch, like.dtype, like.device)
        self.acts = [like.new_empty(k, batch, w) for w in widths[1:]]
        self.back = [like.new_empty(k, batch, w) for w in widths[1:-1]]
        self.ones = like.new_ones(k, 1, batch)

    def fits(self, x: torch.Tensor) -> bool:
        k, batch, dtype, device = self.key
        return x.shape[0] <= k and x.shape[1] == batch and (x.dtype, x.device) == (dtype, device)


class BatchedMLP:
    """Batched (one weight set per client) ``Linear → ReLU → … → Linear`` maths.

    Parameters come as the list ``[W0, b0, W1, b1, …]`` of stacked tensors
    ``(k, out, in)`` and ``(k, out)``, in module order. The instance keeps reusable
    buffers, so it serves one thread at a time.
    """

    def __init__(self, widths: tuple[int, ...]) -> None:
        """``widths``: input features, hidden widths, classes (``len >= 2``)."""
        if len(widths) < 2:
            raise ValueError("an MLP needs at least an input and an output width")
        self.widths = widths
        self.num_layers, self.num_classes = len(widths) - 1, widths[-1]
        self._ws: _Workspace | None = None

    @classmethod
    def of(cls, module: nn.Module) -> BatchedMLP | None:
        """The kernel for ``module``, or None if it is not a plain Linear/ReLU stack."""
        if not isinstance(module, nn.Sequential) or len(module) % 2 != 1:
            return None
        layers = list(module)
        linears = [m for m in layers[0::2] if type(m) is nn.Linear and m.bias is not None]
        if len(linears) != len(layers[0::2]):
            return None
        if not all(type(m) is nn.ReLU for m in layers[1::2]):
            return None
        widths = [linears[0].in_features] + [m.out_features for m in linears]
        if any(a.out_features != b.in_features for a, b in itertools.pairwise(linears)):
            return None
        return cls(tuple(widths))

    def targets(self, y: torch.Tensor, mask: torch.Tensor) -> Targets:
        """Precomputes the loss weights of labels ``y`` and float ``mask`` ``(..., k, B)``;
        a batch of padding only gets zero weights, hence a zero gradient."""
        scale = mask / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
        scale = scale.unsqueeze(-1)
        return Targets(scale, F.one_hot(y, self.num_classes).to(scale.dtype).mul_(scale))

    def _workspace(self, x: torch.Tensor) -> _Workspace:
        if self._ws is None or not self._ws.fits(x):
            self._ws = _Workspace(self.widths, x.shape[0], x)
        return self._ws

    def _forward(self, params: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """Inputs of every layer (after ReLU), then the logits: views of the workspace."""
        ws, k = self._workspace(x), x.shape[0]
        outputs, h = [x], x
        for i in range(self.num_layers):
            weight, bias = params[2 * i], params[2 * i + 1]
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2), out=ws.acts[i][:k])
            if i < self.num_layers - 1:
                h.relu_()
            outputs.append(h)
        return outputs

    def _backward(
        self, params: list[torch.Tensor], x: torch.Tensor, targets: Targets, visit: _Visit
    ) -> None:
        *inputs, logits = self._forward(params, x)
        # d(masked mean cross-entropy)/d logits = (softmax - one-hot) * scale
        delta = torch.softmax(logits, dim=-1).mul_(targets.scale).sub_(targets.target)
        back, k = self._workspace(x).back, x.shape[0]
        for i in reversed(range(self.num_layers)):
            below = None
            if i > 0:  # taken before ``visit`` may update the weight
                below = torch.bmm(delta, params[2 * i], out=back[i - 1][:k])
                _relu_backward_(below, inputs[i])
            visit(i, delta, inputs[i])
            if below is not None:
                delta = below

    def grads(
        self, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """Gradients of each client's masked mean cross-entropy, like ``params``.

        Args:
            params: ``[W0, b0, …]`` stacked over ``k`` clients.
            x: Inputs ``(k, B, d)``.
            y: Labels ``(k, B)``.
            mask: 1.0 for real rows, 0.0 for padding ``(k, B)``; an all-zero row
                gives a zero gradient.

        Returns:
            ``[dW0, db0, …]``.
        """
        return self.grads_with(params, x, self.targets(y, mask))

    def grads_with(
        self, params: list[torch.Tensor], x: torch.Tensor, targets: Targets
    ) -> list[torch.Tensor]:
        """``grads`` with precomputed ``targets``; returns fresh tensors."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(params)

        def store(i: int, delta: torch.Tensor, h: torch.Tensor) -> None:
            out[2 * i] = torch.bmm(delta.transpose(1, 2), h)
            out[2 * i + 1] = delta.sum(dim=1)

        self._backward(params, x, targets, store)
        return out

    def sgd_step_(
        self,
        params: list[torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        learning_rate: float,
    ) -> None:
        """One plain SGD step in place, fused into the gradient products.

        A client whose mask is all zero gets a zero gradient and keeps its weights.
        """
        self.sgd_step_with_(params, x, self.targets(y, mask), learning_rate)

    def sgd_step_with_(
        self, params: list[torch.Tensor], x: torch.Tensor, targets: Targets, learning_rate: float
    ) -> None:
        """``sgd_step_`` with precomputed ``targets``."""
        ones = self._workspace(x).ones[: x.shape[0]]

        def update(i: int, delta: torch.Tensor, h: torch.Tensor) -> None:
            params[2 * i].baddbmm_(delta.transpose(1, 2), h, alpha=-learning_rate)
            # the bias gradient (the batch sum of delta) as a product: one call, no temporary
            params[2 * i + 1].unsqueeze(1).baddbmm_(ones, delta, alpha=-learning_rate)

        self._backward(params, x, targets, update)
