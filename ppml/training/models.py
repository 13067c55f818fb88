"""Model zoo: the torch modules of the architectures in ``ppml.architectures``.

Every architecture maps a batch of ``(B, d)`` float features to ``(B, K)`` logits (``cnn2d``
first unflattens each row to the dataset's declared ``[C, H, W]``, in C order) and
uses only layers that Opacus computes per-sample gradients for (no BatchNorm, no
buffers), so the same module serves the private and the non-private path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from ppml.architectures import InputShape, ModelShape, cnn1d_lengths, cnn2d_sizes
from ppml.specs import ModelSpec

__all__ = ["build_model"]

_Builder = Callable[[ModelShape], nn.Module]


def _group_count(channels: int, length: int) -> int:
    """GroupNorm's group count for ``channels`` channels over ``length`` positions."""
    # GroupNorm needs the group count to divide the channels; gcd(4, c) equals
    # min(4, c) for the usual power-of-two widths and stays valid for odd ones. On a signal
    # of length 1 a group needs two channels, or it normalises a single value (which torch
    # refuses in training); 2 and 4 channels then get half as many groups.
    groups = math.gcd(4, channels)
    while length == 1 and groups > 1 and channels // groups < 2:
        groups //= 2
    return groups


def _build_logreg(shape: ModelShape) -> nn.Module:
    return nn.Sequential(nn.Linear(shape.num_features, shape.num_classes))


def _build_mlp(shape: ModelShape) -> nn.Module:
    layers: list[nn.Module] = []
    width = shape.num_features
    for hidden in shape.model.hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, shape.num_classes))
    return nn.Sequential(*layers)


def _build_cnn1d(shape: ModelShape) -> nn.Module:
    channels, kernel = shape.model.channels, shape.model.kernel_size
    lengths = cnn1d_lengths(shape.num_features, len(channels))
    layers: list[nn.Module] = [nn.Unflatten(1, (1, shape.num_features))]
    in_channels = 1
    for out_channels, length in zip(channels, lengths[:-1], strict=True):
        layers += [
            nn.Conv1d(in_channels, out_channels, kernel, padding="same"),
            nn.GroupNorm(_group_count(out_channels, length), out_channels),
            nn.ReLU(),
        ]
        if length >= 2:
            layers.append(nn.MaxPool1d(2))
        in_channels = out_channels
    layers += [nn.Flatten(), nn.Linear(channels[-1] * lengths[-1], shape.num_classes)]
    return nn.Sequential(*layers)


def _build_cnn2d(shape: ModelShape) -> nn.Module:
    assert shape.input_shape is not None  # ModelShape checked it is [C, H, W]
    in_channels, height, width = shape.input_shape
    channels, kernel = shape.model.channels, shape.model.kernel_size
    sizes = cnn2d_sizes(height, width, len(channels))
    layers: list[nn.Module] = [nn.Unflatten(1, (in_channels, height, width))]
    for out_channels, (h, w) in zip(channels, sizes[:-1], strict=True):
        # GroupNorm, not BatchNorm: per-sample gradients need no batch statistics.
        layers += [
            nn.Conv2d(in_channels, out_channels, kernel, padding="same"),
            nn.GroupNorm(_group_count(out_channels, h * w), out_channels),
            nn.ReLU(),
        ]
        pool = (2 if h >= 2 else 1, 2 if w >= 2 else 1)
        if pool != (1, 1):
            layers.append(nn.MaxPool2d(pool))
        in_channels = out_channels
    h, w = sizes[-1]
    layers += [nn.Flatten(), nn.Linear(channels[-1] * h * w, shape.num_classes)]
    return nn.Sequential(*layers)


# The torch half of ppml.architectures.ARCHITECTURES, under the same names.
_BUILDERS: dict[str, _Builder] = {
    "logreg": _build_logreg,
    "mlp": _build_mlp,
    "cnn1d": _build_cnn1d,
    "cnn2d": _build_cnn2d,
}


def build_model(
    model: ModelSpec,
    *,
    num_features: int,
    num_classes: int,
    input_shape: InputShape | None = None,
) -> nn.Module:
    """Builds a freshly initialised module of ``model``'s architecture.

    Initialisation draws from torch's global RNG; seed it (or fork it) first for
    reproducible weights.

    Args:
        model: The architecture and its sizes.
        num_features: Input width ``d``.
        num_classes: Number of output logits ``K``.
        input_shape: The dataset's declared shape of a row (``[C, H, W]`` for cnn2d), or
            None.

    Returns:
        A module mapping ``(B, num_features)`` float inputs to ``(B, num_classes)`` logits.

    Raises:
        ValueError: If the shape is invalid (see ``ppml.architectures.ModelShape``).
    """
    shape = ModelShape(
        model=model, num_features=num_features, num_classes=num_classes, input_shape=input_shape
    )
    return _BUILDERS[model.arch](shape)
