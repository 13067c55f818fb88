"""Single-pass DP-SGD: per-sample clipping from one backward pass (ghost norm, mixed).

``FastDPEngine`` computes the same clipped, noised gradient as Opacus' hooks and
``DPOptimizer`` without a second backward pass and, for most layers, without forming
per-sample gradients. Native rules cover ``Linear``, ``Conv1d``, ``Conv2d``,
``Embedding``, ``GroupNorm`` and ``LayerNorm``; any other trainable layer goes through
Opacus' per-sample gradient function for it. See ``rules`` for the mathematics.
"""

from ppml.training.fast_dp.engine import FastDPEngine, unsupported_layers

__all__ = ["FastDPEngine", "unsupported_layers"]
