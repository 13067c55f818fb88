"""Which rule computes per-sample norms and clipped sums for which layer type."""

from __future__ import annotations

from torch import Tensor, nn

from ppml.training.fast_dp.bilinear import ConvRule, LinearRule
from ppml.training.fast_dp.rules import (
    EmbeddingRule,
    GroupNormRule,
    LayerNormRule,
    OpacusRule,
    Rule,
)

__all__ = ["NATIVE_RULES", "native_rule", "rule_for"]

NATIVE_RULES: dict[type[nn.Module], type[Rule]] = {
    nn.Linear: LinearRule,
    nn.Conv1d: ConvRule,
    nn.Conv2d: ConvRule,
    nn.Embedding: EmbeddingRule,
    nn.GroupNorm: GroupNormRule,
    nn.LayerNorm: LayerNormRule,
}


def native_rule(module: nn.Module) -> type[Rule] | None:
    """The native rule for ``module``, or None where only the Opacus fallback applies.

    Types match exactly, as in Opacus: a subclass may change ``forward``.
    """
    if isinstance(module, nn.Embedding) and (module.sparse or module.scale_grad_by_freq):
        return None  # sparse gradients, or a batch-dependent scaling of them
    return NATIVE_RULES.get(type(module))


def rule_for(module: nn.Module, grads: dict[Tensor, Tensor]) -> Rule:
    """Builds the native rule for ``module``, or the Opacus fallback."""
    return (native_rule(module) or OpacusRule)(module, grads)
