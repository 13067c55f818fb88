"""Model zoo: a registry of Opacus-compatible architectures for tabular features.

Every architecture maps a batch of ``(B, d)`` float features to ``(B, K)`` logits and
uses only layers that Opacus computes per-sample gradients for (no BatchNorm, no
buffers), so the same module serves the private and the non-private path.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ppml.specs import cnn1d_problem

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "build_model",
    "count_parameters",
]


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything needed to rebuild a model; stored with exported weights.

    Attributes:
        arch: Registry name (see ``ARCHITECTURES``).
        num_features: Input width ``d``.
        num_classes: Number of output logits ``K``.
        hidden_sizes: Widths of the hidden layers (``mlp`` only).
        channels: Output channels of each convolution block (``cnn1d`` only).
        kernel_size: Convolution kernel width (``cnn1d`` only).
    """

    arch: str
    num_features: int
    num_classes: int
    hidden_sizes: tuple[int, ...] = (128,)
    channels: tuple[int, ...] = (16, 32)
    kernel_size: int = 5


Builder = Callable[[ArchitectureSpec], nn.Module]


def _linear_params(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def _group_count(channels: int, length: int) -> int:
    # GroupNorm needs the group count to divide the channels; gcd(4, c) equals
    # min(4, c) for the usual power-of-two widths and stays valid for odd ones. On a signal
    # of length 1 a group needs two channels, or it normalises a single value (which torch
    # refuses in training); 2 and 4 channels then get half as many groups.
    groups = math.gcd(4, channels)
    while length == 1 and groups > 1 and channels // groups < 2:
        groups //= 2
    return groups


def _build_logreg(spec: ArchitectureSpec) -> nn.Module:
    return nn.Sequential(nn.Linear(spec.num_features, spec.num_classes))


def _build_mlp(spec: ArchitectureSpec) -> nn.Module:
    layers: list[nn.Module] = []
    width = spec.num_features
    for hidden in spec.hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, spec.num_classes))
    return nn.Sequential(*layers)


def _cnn1d_pools(num_features: int, num_blocks: int) -> list[bool]:
    """Which blocks end with a MaxPool1d(2): pool while the signal is at least 2 long."""
    pools, length = [], num_features
    for _ in range(num_blocks):
        pool = length >= 2
        pools.append(pool)
        length = length // 2 if pool else length
    return pools


def _cnn1d_flat_width(spec: ArchitectureSpec) -> int:
    length = spec.num_features
    for pool in _cnn1d_pools(spec.num_features, len(spec.channels)):
        length = length // 2 if pool else length
    last = spec.channels[-1] if spec.channels else 1
    return last * length


def _build_cnn1d(spec: ArchitectureSpec) -> nn.Module:
    layers: list[nn.Module] = [nn.Unflatten(1, (1, spec.num_features))]
    in_channels, length = 1, spec.num_features
    pools = _cnn1d_pools(spec.num_features, len(spec.channels))
    for out_channels, pool in zip(spec.channels, pools, strict=True):
        layers += [
            nn.Conv1d(in_channels, out_channels, spec.kernel_size, padding="same"),
            nn.GroupNorm(_group_count(out_channels, length), out_channels),
            nn.ReLU(),
        ]
        if pool:
            layers.append(nn.MaxPool1d(2))
            length //= 2
        in_channels = out_channels
    layers += [nn.Flatten(), nn.Linear(_cnn1d_flat_width(spec), spec.num_classes)]
    return nn.Sequential(*layers)


ARCHITECTURES: dict[str, Builder] = {
    "logreg": _build_logreg,
    "mlp": _build_mlp,
    "cnn1d": _build_cnn1d,
}


def _spec(
    arch: str,
    num_features: int,
    num_classes: int,
    hidden_sizes: Sequence[int],
    channels: Sequence[int],
    kernel_size: int,
) -> ArchitectureSpec:
    if arch not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {arch!r}; known: {known}")
    sizes = (num_features, num_classes, kernel_size, *hidden_sizes, *channels)
    if any(int(size) < 1 for size in sizes):
        raise ValueError("layer sizes, feature and class counts must be positive")
    if arch == "cnn1d" and (problem := cnn1d_problem(channels, num_features)) is not None:
        raise ValueError(problem)
    return ArchitectureSpec(
        arch=arch,
        num_features=int(num_features),
        num_classes=int(num_classes),
        hidden_sizes=tuple(int(h) for h in hidden_sizes),
        channels=tuple(int(c) for c in channels),
        kernel_size=int(kernel_size),
    )


def build_model(
    arch: str,
    *,
    num_features: int,
    num_classes: int,
    hidden_sizes: Sequence[int] = (128,),
    channels: Sequence[int] = (16, 32),
    kernel_size: int = 5,
) -> nn.Module:
    """Builds a freshly initialised model from the registry.

    Initialisation draws from torch's global RNG; seed it (or fork it) first for
    reproducible weights.

    Args:
        arch: Registry name: ``"logreg"``, ``"mlp"`` or ``"cnn1d"``.
        num_features: Input width ``d``.
        num_classes: Number of output logits ``K``.
        hidden_sizes: Hidden widths for ``mlp``; ignored otherwise.
        channels: Convolution channels for ``cnn1d``; ignored otherwise.
        kernel_size: Convolution kernel width for ``cnn1d``; ignored otherwise.

    Returns:
        A module mapping ``(B, num_features)`` float inputs to ``(B, num_classes)`` logits.

    Raises:
        ValueError: If ``arch`` is not registered or a size is not positive.
    """
    spec = _spec(arch, num_features, num_classes, hidden_sizes, channels, kernel_size)
    return ARCHITECTURES[spec.arch](spec)


def _count_mlp(spec: ArchitectureSpec) -> int:
    widths = [spec.num_features, *spec.hidden_sizes, spec.num_classes]
    return sum(_linear_params(a, b) for a, b in itertools.pairwise(widths))


def _count_cnn1d(spec: ArchitectureSpec) -> int:
    total, in_channels = 0, 1
    for out_channels in spec.channels:
        conv = in_channels * out_channels * spec.kernel_size + out_channels
        total += conv + 2 * out_channels  # GroupNorm: affine weight and bias
        in_channels = out_channels
    return total + _linear_params(_cnn1d_flat_width(spec), spec.num_classes)


_COUNTERS: dict[str, Callable[[ArchitectureSpec], int]] = {
    "logreg": lambda spec: _linear_params(spec.num_features, spec.num_classes),
    "mlp": _count_mlp,
    "cnn1d": _count_cnn1d,
}


def count_parameters(
    arch: str,
    *,
    num_features: int,
    num_classes: int,
    hidden_sizes: Sequence[int] = (128,),
    channels: Sequence[int] = (16, 32),
    kernel_size: int = 5,
) -> int:
    """Counts trainable parameters without allocating any tensor.

    Args:
        arch: Registry name.
        num_features: Input width ``d``.
        num_classes: Number of output logits ``K``.
        hidden_sizes: Hidden widths for ``mlp``.
        channels: Convolution channels for ``cnn1d``.
        kernel_size: Convolution kernel width for ``cnn1d``.

    Returns:
        The number of scalars in the model's parameters.

    Raises:
        ValueError: If ``arch`` is not registered or a size is not positive.
    """
    spec = _spec(arch, num_features, num_classes, hidden_sizes, channels, kernel_size)
    return _COUNTERS[spec.arch](spec)
