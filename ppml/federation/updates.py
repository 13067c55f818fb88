"""Checks of a node's uploaded update, with numpy (the API never imports torch).

An update is a safetensors file holding ``local − global`` in float32, with the global
weights' keys and shapes; its ``__metadata__`` may carry ``epsilon`` and ``epsilon_total``
(sample mode: what the node charged). Client mode also bounds its L2 norm by ``1.01·C``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load

from ppml.errors import InvalidInput

__all__ = [
    "NORM_SLACK",
    "CheckedUpdate",
    "MalformedUpdate",
    "check_update",
    "read_header",
    "tensor_shapes",
]

#: A client-mode update may exceed the clipping norm by this factor (float32 rounding).
NORM_SLACK = 1.01
_MAX_HEADER = 16 << 20


class MalformedUpdate(InvalidInput):
    """An update with other keys, shapes or dtypes than the model's, a NaN or an infinity,
    or a norm above the clipping bound (422; the task is marked rejected)."""

    code = "malformed-update"
    title = "Malformed update"


@dataclass(frozen=True, kw_only=True)
class CheckedUpdate:
    epsilon: float | None
    epsilon_total: float | None
    norm: float


def read_header(body: bytes) -> dict[str, object]:
    """The JSON header of a safetensors file (``__metadata__`` included).

    Raises:
        MalformedUpdate: not a safetensors file.
    """
    if len(body) < 8:
        raise MalformedUpdate("the update is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", body[:8])
    if size > min(len(body) - 8, _MAX_HEADER):
        raise MalformedUpdate("the update is not a safetensors file (bad header length)")
    try:
        header = json.loads(body[8 : 8 + size])
    except (ValueError, UnicodeDecodeError):
        raise MalformedUpdate("the update is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise MalformedUpdate("the update is not a safetensors file (bad header)")
    return header


def tensor_shapes(header: dict[str, object]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a safetensors header."""
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise MalformedUpdate(f"tensor {name!r} has no shape")
        shapes[name] = (str(info.get("dtype")), tuple(int(n) for n in info["shape"]))
    return shapes


def _metadata_float(metadata: dict[str, object], key: str) -> float | None:
    value = metadata.get(key)
    if value is None:
        return None
    try:
        number = float(str(value))
    except ValueError:
        raise MalformedUpdate(f"__metadata__.{key} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise MalformedUpdate(f"__metadata__.{key} must be finite and non-negative")
    return number


def check_update(
    body: bytes, expected: dict[str, tuple[int, ...]], *, clip_norm: float | None
) -> CheckedUpdate:
    """Check an update against the global weights' shapes (``expected``).

    Raises:
        MalformedUpdate: why the update is refused (names no value of the data).
    """
    header = read_header(body)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise MalformedUpdate("__metadata__ must be an object of strings")
    shapes = tensor_shapes(header)
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        raise MalformedUpdate(f"wrong tensors: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, (dtype, shape) in shapes.items():
        if dtype != "F32":
            raise MalformedUpdate(f"tensor {name!r} is {dtype}; updates are float32 (F32)")
        if shape != tuple(expected[name]):
            raise MalformedUpdate(
                f"tensor {name!r} has shape {list(shape)}; the model's is {list(expected[name])}"
            )
    try:
        tensors = load(body)
    except Exception:  # safetensors raises its own error types for truncated files
        raise MalformedUpdate("the update's tensors cannot be read (truncated?)") from None
    squares = 0.0
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise MalformedUpdate(f"tensor {name!r} holds NaN or infinite values")
        squares += float(np.square(array, dtype=np.float64).sum())
    norm = math.sqrt(squares)
    if clip_norm is not None and norm > NORM_SLACK * clip_norm:
        raise MalformedUpdate(
            f"the update's L2 norm {norm:.4g} exceeds the clipping norm {clip_norm:g} "
            f"(allowed up to {NORM_SLACK}×)"
        )
    return CheckedUpdate(
        epsilon=_metadata_float(metadata, "epsilon"),
        epsilon_total=_metadata_float(metadata, "epsilon_total"),
        norm=norm,
    )
