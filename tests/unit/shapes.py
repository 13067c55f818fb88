"""Input shapes for tests that run every architecture on rows of a given width."""

from __future__ import annotations

import math

from ppml.architectures import ARCHITECTURES


def input_shape_for(arch: str, features: int) -> tuple[int, ...] | None:
    """An image shape where the architecture needs one (cnn2d): the squarest 1 x H x W."""
    if ARCHITECTURES[arch].input_dims is None:
        return None
    height = max(h for h in range(1, math.isqrt(features) + 1) if features % h == 0)
    return (1, height, features // height)
