"""The single-pass DP-SGD engine: hooks, one backward, clipping, noise, gradients.

Forward hooks record each trainable layer's inputs and the autograd edge of its output.
One ``torch.autograd.grad`` of the summed loss with respect to those edges yields every
layer's output gradient; the parameters' own gradients are never formed by autograd.
Under ``no_grad`` the layer rules then give per-sample norms, the clip factors follow,
and each layer writes its clipped sum on top of Gaussian noise in one flat buffer whose
slices become ``p.grad``. The result is what Opacus' ``DPOptimizer`` hands to the inner
optimizer: ``(Σ_i min(1, C/(‖∇_i‖ + 1e-6)) ∇_i + N(0, σ²C²)) / expected_batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus import GradSampleModule
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from ppml.training.fast_dp.registry import native_rule, rule_for
from ppml.training.fast_dp.rules import Call, Rule

__all__ = ["FastDPEngine", "unsupported_layers"]

# Opacus' guard against a zero norm in min(1, C / (norm + 1e-6)); kept for parity.
NORM_EPS = 1e-6

_Record = tuple[tuple[Tensor, ...], Tensor, GradientEdge]


def _trainable_layers(module: nn.Module) -> list[tuple[str, nn.Module, list[nn.Parameter]]]:
    """Modules owning trainable parameters directly, each with those parameters."""
    layers = []
    for name, layer in module.named_modules():
        params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
        if params:
            layers.append((name or type(layer).__name__, layer, params))
    return layers


def _structural_problems(module: nn.Module) -> list[str]:
    """Reasons the engine cannot run ``module`` at all (not even with the fallback)."""
    problems: list[str] = []
    owners: set[int] = set()
    for name, _layer, params in _trainable_layers(module):
        if any(id(p) in owners for p in params):
            problems.append(f"{name}: parameter shared with another layer")
        owners.update(id(p) for p in params)
    kinds = {(p.dtype, p.device) for p in module.parameters() if p.requires_grad}
    if len(kinds) > 1:
        problems.append("trainable parameters differ in dtype or device")
    return problems


def unsupported_layers(module: nn.Module) -> list[str]:
    """Why the engine would not run ``module`` natively; empty if it would.

    Layers listed by name alone fall back to Opacus' per-sample gradient functions
    under ``FastDPEngine``; the other entries make the engine refuse the module.
    """
    natives = [
        name for name, layer, _params in _trainable_layers(module) if native_rule(layer) is None
    ]
    return natives + _structural_problems(module)


class FastDPEngine:
    """Per-sample clipped, noised gradients of ``module`` from a single backward pass.

    Args:
        module: The model; hooks are attached until ``close``.
        noise_multiplier: σ, noise std relative to ``max_grad_norm``.
        max_grad_norm: C, the per-sample clipping norm over all parameters.
        expected_batch_size: Divides the noisy sum (Poisson sampling: ``q · n``).
        generator: Source of the noise (keep its seed secret).

    Raises:
        NotImplementedError: If a trainable layer has buffers (as in Opacus), a
            parameter is shared between layers, or parameters differ in dtype/device.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator,
    ) -> None:
        GradSampleModule.validate(module, strict=True)
        problems = _structural_problems(module)
        if problems:
            raise NotImplementedError("; ".join(problems))
        self._sigma, self._clip = float(noise_multiplier), float(max_grad_norm)
        self._expected = float(expected_batch_size)
        self._generator = generator
        params = [p for p in module.parameters() if p.requires_grad]
        self._flat = torch.zeros(
            sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device
        )
        self._grads: list[tuple[nn.Parameter, Tensor]] = []
        offset = 0
        for p in params:
            self._grads.append((p, self._flat[offset : offset + p.numel()].view_as(p)))
            offset += p.numel()
        views = dict(self._grads)
        self._names: list[str] = []
        self._rules: list[Rule] = []
        self._records: list[list[_Record]] = []
        self._handles: list[RemovableHandle] = []
        for name, layer, owned in _trainable_layers(module):
            self._names.append(name)
            self._rules.append(rule_for(layer, {p: views[p] for p in owned}))
            self._records.append([])
            hook = self._recorder(self._rules[-1], self._records[-1])
            self._handles.append(layer.register_forward_hook(hook))

    @staticmethod
    def _recorder(rule: Rule, records: list[_Record]) -> Callable[..., None]:
        def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> None:
            if layer.training and torch.is_grad_enabled():
                out = output if isinstance(output, Tensor) else output[0]
                # The edge pins the gradient *into* this output, even if a later
                # in-place op (ReLU(inplace=True)) rewrites the tensor itself.
                records.append((rule.capture(inputs, out), out, get_gradient_edge(out)))

        return hook

    def backward(self, loss: Tensor) -> None:
        """Sets every trainable ``p.grad`` to its clipped, noised, averaged gradient.

        Args:
            loss: The *summed* (not averaged) loss of the batch just forwarded.

        Raises:
            RuntimeError: If no forward pass was recorded, or a layer was not called.
        """
        first = next((r for layer_records in self._records for r in layer_records), None)
        if first is None:
            raise RuntimeError("no forward pass in training mode was recorded")
        if first[0][0].shape[0] == 0:
            self.noise_only()
            return
        calls = self._calls(loss)
        with torch.no_grad():
            norms = [n for rule, c in zip(self._rules, calls, strict=True) for n in rule.norms(c)]
            total = torch.linalg.vector_norm(torch.stack(norms), dim=0)
            # alpha * scale_i = min(1, C / (‖∇_i‖ + eps)) / B_expected, as in Opacus
            scale = total.add_(NORM_EPS).reciprocal_().clamp_(max=1.0 / self._clip)
            alpha = self._clip / self._expected
            self._draw_noise()
            for rule in self._rules:
                rule.accumulate(scale, alpha, self._sigma * alpha)
        self._publish()

    def _calls(self, loss: Tensor) -> list[list[Call]]:
        """Every layer's calls with their output gradients, from one autograd pass."""
        records = [list(layer_records) for layer_records in self._records]
        self._forget()  # the next forward starts afresh, even if this step fails
        missing = [name for name, rs in zip(self._names, records, strict=True) if not rs]
        if missing:
            raise RuntimeError(f"layers not called in the forward pass: {', '.join(missing)}")
        edges = [edge for layer_records in records for _, _, edge in layer_records]
        grads = iter(torch.autograd.grad(loss, edges, allow_unused=True))
        calls = []
        for layer_records in records:
            layer_calls = []
            for inputs, out, _edge in layer_records:
                grad = next(grads)  # None: this output did not reach the loss
                layer_calls.append(Call(inputs, torch.zeros_like(out) if grad is None else grad))
            calls.append(layer_calls)
        return calls

    @property
    def flat_grad(self) -> Tensor:
        """Every trainable ``p.grad`` as one buffer (they are views of it): one all-reduce
        of this tensor sums the gradients of data-parallel replicas."""
        return self._flat

    def noise_only(self) -> None:
        """The update of an empty batch: noise alone, ``N(0, σ²C²) / B_expected``."""
        with torch.no_grad():
            self._draw_noise()
            self._flat.mul_(self._sigma * self._clip / self._expected)
        self._forget()
        self._publish()

    def close(self) -> None:
        """Removes the hooks; the module is a plain module again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._forget()

    def _draw_noise(self) -> None:
        if self._sigma == 0:
            self._flat.zero_()
            return
        # One draw per parameter, in parameter order, as DPOptimizer draws them: the
        # generator then advances exactly as under Opacus, so a seeded run samples
        # the same Poisson batches and the same noise with either engine.
        for _, grad in self._grads:
            grad.normal_(generator=self._generator)

    def _forget(self) -> None:
        for layer_records in self._records:
            layer_records.clear()

    def _publish(self) -> None:
        for p, grad in self._grads:
            if p.grad is not grad:
                p.grad = grad
