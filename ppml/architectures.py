"""Model architectures without torch: one registry entry per ``ModelSpec.arch``.

An entry knows its architecture's parameter count and why a spec cannot train on a
dataset, so the API prices and validates jobs with it; ``ppml.training.models`` builds the
torch module for the same name, and a test holds every count to the built module's. A
:class:`ModelShape` (a ``ModelSpec`` on a dataset's width and class count) is what model
files record under ``metadata["architecture"]``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from ppml.specs import ModelSpec

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ModelProblem",
    "ModelShape",
    "architecture",
    "cnn1d_lengths",
    "count_parameters",
    "model_problem",
]


class ModelProblem(NamedTuple):
    """Why a spec cannot train on a dataset: the ``ModelSpec`` field at fault, and why."""

    field: str
    message: str


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A model spec on a dataset's feature width and class count: all that fixes the layers.

    Raises:
        ValueError: If a count is not positive, the architecture is unknown, or it cannot
            train on ``num_features`` inputs (see :func:`model_problem`).
    """

    model: ModelSpec
    num_features: int
    num_classes: int

    def __post_init__(self) -> None:
        if self.num_features < 1 or self.num_classes < 1:
            raise ValueError("feature and class counts must be positive")
        problem = model_problem(self.model, num_features=self.num_features)
        if problem is not None:
            raise ValueError(problem.message)

    @property
    def parameter_count(self) -> int:
        """Trainable parameters of the module, counted without building it."""
        return architecture(self.model.arch).count(self)

    def as_dict(self) -> dict[str, object]:
        """The spec's fields with ``num_features`` and ``num_classes`` (JSON-ready)."""
        fields: dict[str, object] = self.model.model_dump(mode="json")
        fields.update(num_features=self.num_features, num_classes=self.num_classes)
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
            model = ModelSpec.model_validate(fields)
            return cls(model=model, num_features=int(num_features), num_classes=int(num_classes))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError("artefact architecture metadata is malformed") from exc


def _trains_on_any_width(_model: ModelSpec, _num_features: int) -> ModelProblem | None:
    return None


@dataclass(frozen=True)
class Architecture:
    """One registry entry.

    Attributes:
        name: The ``ModelSpec.arch`` it answers to.
        count: Trainable parameters of a shape.
        problem: Why a spec cannot train on ``num_features`` inputs, or None.
    """

    name: str
    count: Callable[[ModelShape], int]
    problem: Callable[[ModelSpec, int], ModelProblem | None] = _trains_on_any_width


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


def _cnn1d_problem(model: ModelSpec, num_features: int) -> ModelProblem | None:
    # A block normalises groups of channels over the signal's length; a 1-channel block on
    # a signal pooled down to length 1 would normalise a single value.
    lengths = cnn1d_lengths(num_features, len(model.channels))
    for index, (width, length) in enumerate(zip(model.channels, lengths[:-1], strict=True)):
        if width == 1 and length == 1:
            return ModelProblem(
                "channels",
                f"cnn1d block {index} has 1 channel on a signal of length 1; "
                "use at least 2 channels there",
            )
    return None


def _count_cnn1d(shape: ModelShape) -> int:
    channels, kernel = shape.model.channels, shape.model.kernel_size
    # Each block: a convolution (weights and bias) and GroupNorm's affine weight and bias.
    blocks = sum(
        c_in * c_out * kernel + 3 * c_out for c_in, c_out in itertools.pairwise([1, *channels])
    )
    flat = channels[-1] * cnn1d_lengths(shape.num_features, len(channels))[-1]
    return blocks + _linear(flat, shape.num_classes)


ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        entry.name: entry
        for entry in (
            Architecture("logreg", count=lambda s: _linear(s.num_features, s.num_classes)),
            Architecture("mlp", count=_count_mlp),
            Architecture("cnn1d", count=_count_cnn1d, problem=_cnn1d_problem),
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


def model_problem(model: ModelSpec, *, num_features: int) -> ModelProblem | None:
    """Why ``model`` cannot train on ``num_features`` inputs, or None."""
    return architecture(model.arch).problem(model, num_features)


def count_parameters(model: ModelSpec, *, num_features: int, num_classes: int) -> int:
    """Trainable parameters of ``model`` on a dataset, counted without building it.

    Raises:
        ValueError: As :class:`ModelShape` does.
    """
    shape = ModelShape(model=model, num_features=num_features, num_classes=num_classes)
    return shape.parameter_count
