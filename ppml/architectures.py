"""Model architectures without torch: one registry entry per ``ModelSpec.arch``.

An entry knows its architecture's parameter count, the input shape it needs, and why a
spec cannot train on a dataset, so the API prices and validates jobs with it;
``ppml.training.models`` builds the torch module for the same name, and a test holds every
count to the built module's. A :class:`ModelShape` (a ``ModelSpec`` on a dataset's width,
class count and declared input shape) is what model files record under
``metadata["architecture"]``. Every module takes flat ``(B, num_features)`` rows; an
architecture that needs the declared shape (``cnn2d`` needs ``[C, H, W]``) unflattens them
in C order.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from ppml.specs import ModelSpec

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "InputShape",
    "ModelProblem",
    "ModelShape",
    "architecture",
    "cnn1d_lengths",
    "cnn2d_sizes",
    "count_parameters",
    "input_shape_problem",
    "model_problem",
]


InputShape = tuple[int, ...]


class ModelProblem(NamedTuple):
    """Why a spec cannot train on a dataset: the field at fault, and why.

    ``field`` names a ``ModelSpec`` field (``"channels"``), or ``"arch"`` when the
    dataset lacks what the architecture needs (a declared input shape).
    """

    field: str
    message: str


def input_shape_problem(input_shape: InputShape | None, num_features: int) -> str | None:
    """Why ``input_shape`` cannot describe rows of ``num_features`` values, or None."""
    if input_shape is None:
        return None
    if not 1 <= len(input_shape) <= 3 or any(size < 1 for size in input_shape):
        return "input_shape must have 1 to 3 positive sizes"
    if math.prod(input_shape) != num_features:
        return (
            f"input_shape {list(input_shape)} holds {math.prod(input_shape)} values per row; "
            f"the data has {num_features} features"
        )
    return None


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A model spec on a dataset's feature width, class count and declared input shape.

    Raises:
        ValueError: If a count is not positive, the input shape does not hold
            ``num_features`` values, the architecture is unknown, or it cannot train on
            the data (see :func:`model_problem`).
    """

    model: ModelSpec
    num_features: int
    num_classes: int
    input_shape: InputShape | None = None
    # Per feature (low, high, mean, std): inputs are clipped to [low, high], centred and
    # scaled before the network (the dataset's released statistics); None: used as given.
    standardize: tuple[tuple[float, float, float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.num_features < 1 or self.num_classes < 1:
            raise ValueError("feature and class counts must be positive")
        if self.standardize is not None:
            rows = tuple(tuple(float(v) for v in row) for row in self.standardize)
            if len(rows) != self.num_features or any(
                len(row) != 4 or not row[0] < row[1] or not row[3] > 0 for row in rows
            ):
                raise ValueError("standardize needs (low < high, mean, std > 0) per feature")
            object.__setattr__(self, "standardize", rows)
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        shape_problem = input_shape_problem(self.input_shape, self.num_features)
        if shape_problem is not None:
            raise ValueError(shape_problem)
        problem = model_problem(
            self.model, num_features=self.num_features, input_shape=self.input_shape
        )
        if problem is not None:
            raise ValueError(problem.message)

    @property
    def parameter_count(self) -> int:
        """Trainable parameters of the module, counted without building it."""
        return architecture(self.model.arch).count(self)

    def as_dict(self) -> dict[str, object]:
        """The spec's fields with ``num_features``, ``num_classes`` and, when declared,
        ``input_shape`` (JSON-ready)."""
        fields: dict[str, object] = self.model.model_dump(mode="json")
        fields.update(num_features=self.num_features, num_classes=self.num_classes)
        if self.input_shape is not None:
            fields["input_shape"] = list(self.input_shape)
        if self.standardize is not None:
            fields["standardize"] = [list(row) for row in self.standardize]
        return fields

    def to_metadata(self) -> str:
        """:meth:`as_dict` as a JSON object with sorted keys, as model files record it."""
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_metadata(cls, text: str) -> ModelShape:
        """The shape a model file recorded with :meth:`to_metadata`.

        Raises:
            ValueError: If ``text`` is not such a record.
        """
        try:
            fields = json.loads(text)
            num_features, num_classes = fields.pop("num_features"), fields.pop("num_classes")
            raw_shape = fields.pop("input_shape", None)
            input_shape = None if raw_shape is None else tuple(int(s) for s in raw_shape)
            scaling = fields.pop("standardize", None)
            model = ModelSpec.model_validate(fields)
            return cls(
                model=model,
                num_features=int(num_features),
                num_classes=int(num_classes),
                input_shape=input_shape,
                standardize=None if scaling is None else tuple(tuple(row) for row in scaling),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError("artefact architecture metadata is malformed") from exc


def _trains_on_any_input(
    _model: ModelSpec, _num_features: int, _input_shape: InputShape | None
) -> ModelProblem | None:
    return None


@dataclass(frozen=True)
class Architecture:
    """One registry entry.

    Attributes:
        name: The ``ModelSpec.arch`` it answers to.
        count: Trainable parameters of a shape.
        problem: Why a spec cannot train on ``num_features`` inputs of the declared input
            shape (None when the dataset declares none), or None.
        input_dims: How many sizes the dataset's declared ``input_shape`` must have (3 for
            images, ``[C, H, W]``), or None if the architecture takes flat rows of any
            shape. A rule that chooses an architecture from public metadata can read it.
    """

    name: str
    count: Callable[[ModelShape], int]
    problem: Callable[[ModelSpec, int, InputShape | None], ModelProblem | None] = (
        _trains_on_any_input
    )
    input_dims: int | None = None

    def fits(self, input_shape: InputShape | None) -> bool:
        """Whether data of this declared input shape has what the architecture needs."""
        if self.input_dims is None:
            return True
        return input_shape is not None and len(input_shape) == self.input_dims


def _linear(fan_in: int, fan_out: int) -> int:
    return (fan_in + 1) * fan_out  # weight and bias


def _count_mlp(shape: ModelShape) -> int:
    widths = [shape.num_features, *shape.model.hidden_sizes, shape.num_classes]
    return sum(_linear(a, b) for a, b in itertools.pairwise(widths))


def cnn1d_lengths(num_features: int, blocks: int) -> list[int]:
    """The signal's length entering each of ``blocks`` conv blocks, then after the last.

    A block ends with a ``MaxPool1d(2)`` while the signal is at least 2 long.
    """
    lengths = [num_features]
    for _ in range(blocks):
        lengths.append(lengths[-1] // 2 if lengths[-1] >= 2 else lengths[-1])
    return lengths


def cnn2d_sizes(height: int, width: int, blocks: int) -> list[tuple[int, int]]:
    """The image's ``(H, W)`` entering each of ``blocks`` conv blocks, then after the last.

    A block ends with a max-pool that halves (rounding down) each side at least 2 long
    and leaves a side of 1 as it is.
    """
    sizes = [(height, width)]
    for _ in range(blocks):
        h, w = sizes[-1]
        sizes.append((h // 2 if h >= 2 else h, w // 2 if w >= 2 else w))
    return sizes


def _one_channel_problem(
    arch: str, channels: list[int], positions: list[int], where: str
) -> ModelProblem | None:
    # A block normalises groups of channels over its positions; a 1-channel block on a
    # single position would normalise a single value (which torch refuses in training).
    for index, (width, count) in enumerate(zip(channels, positions, strict=True)):
        if width == 1 and count == 1:
            return ModelProblem(
                "channels",
                f"{arch} block {index} has 1 channel on {where}; use at least 2 channels there",
            )
    return None


def _cnn1d_problem(
    model: ModelSpec, num_features: int, _input_shape: InputShape | None
) -> ModelProblem | None:
    lengths = cnn1d_lengths(num_features, len(model.channels))
    return _one_channel_problem("cnn1d", model.channels, lengths[:-1], "a signal of length 1")


def _count_cnn1d(shape: ModelShape) -> int:
    channels, kernel = shape.model.channels, shape.model.kernel_size
    # Each block: a convolution (weights and bias) and GroupNorm's affine weight and bias.
    blocks = sum(
        c_in * c_out * kernel + 3 * c_out for c_in, c_out in itertools.pairwise([1, *channels])
    )
    flat = channels[-1] * cnn1d_lengths(shape.num_features, len(channels))[-1]
    return blocks + _linear(flat, shape.num_classes)


def _cnn2d_problem(
    model: ModelSpec, _num_features: int, input_shape: InputShape | None
) -> ModelProblem | None:
    if input_shape is None or len(input_shape) != 3:
        declared = "none" if input_shape is None else str(list(input_shape))
        return ModelProblem(
            "arch",
            "cnn2d needs a dataset that declares a 3-D input_shape [channels, height, width] "
            f"in its schema (this one declares {declared})",
        )
    sizes = cnn2d_sizes(input_shape[1], input_shape[2], len(model.channels))
    positions = [h * w for h, w in sizes[:-1]]
    return _one_channel_problem("cnn2d", model.channels, positions, "a 1x1 map")


def _count_cnn2d(shape: ModelShape) -> int:
    assert shape.input_shape is not None  # ModelShape checked it
    in_channels, height, width = shape.input_shape
    channels, kernel = shape.model.channels, shape.model.kernel_size
    blocks = sum(
        c_in * c_out * kernel * kernel + 3 * c_out
        for c_in, c_out in itertools.pairwise([in_channels, *channels])
    )
    h, w = cnn2d_sizes(height, width, len(channels))[-1]
    return blocks + _linear(channels[-1] * h * w, shape.num_classes)


ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        entry.name: entry
        for entry in (
            Architecture("logreg", count=lambda s: _linear(s.num_features, s.num_classes)),
            Architecture("mlp", count=_count_mlp),
            Architecture("cnn1d", count=_count_cnn1d, problem=_cnn1d_problem),
            Architecture("cnn2d", count=_count_cnn2d, problem=_cnn2d_problem, input_dims=3),
        )
    }
)


def architecture(name: str) -> Architecture:
    """The registry entry called ``name``.

    Raises:
        ValueError: If no architecture has that name.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def model_problem(
    model: ModelSpec, *, num_features: int, input_shape: InputShape | None = None
) -> ModelProblem | None:
    """Why ``model`` cannot train on ``num_features`` inputs of the declared
    ``input_shape`` (None: the dataset declares none), or None."""
    return architecture(model.arch).problem(model, num_features, input_shape)


def count_parameters(
    model: ModelSpec,
    *,
    num_features: int,
    num_classes: int,
    input_shape: InputShape | None = None,
) -> int:
    """Trainable parameters of ``model`` on a dataset, counted without building it.

    Raises:
        ValueError: As :class:`ModelShape` does.
    """
    shape = ModelShape(
        model=model, num_features=num_features, num_classes=num_classes, input_shape=input_shape
    )
    return shape.parameter_count
