"""The dataset schema an owner declares at upload: what may be released about the data's shape.

The label set is part of it: released class names must come from the owner's declaration,
never from the distinct values of the private target column (PRIVACY.md, "Every release is
a mechanism"). So is the input shape of a row (``[1, 8, 8]`` for 8x8 grey images): public
metadata the owner declares (or the shape of an NPZ upload's ``x`` array, which the owner
chose), never inferred from the values. So are per-feature clipping bounds (``bounds``), which
the dataset's DP standardisation statistics clip to. Later versions add column names.

Pure pydantic; the API process imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ppml.errors import InvalidInput

__all__ = [
    "MAX_CLASS_NAME",
    "MAX_INPUT_SIZE",
    "DatasetSchema",
    "canonical_label",
    "check_bounds",
    "check_input_shape",
    "declared_bounds",
    "parse_schema",
]

MAX_CLASS_NAME = 200
MAX_INPUT_SIZE = 1_000_000  # one side of a declared input shape


class DatasetSchema(BaseModel):
    """A dataset's declared schema.

    Attributes:
        classes: The label set; class index ``i`` is the label at position ``i``.
        input_shape: The shape of one row's features (their product is the feature
            count; rows are stored flat, in C order), or None.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: list[str] = Field(
        min_length=2,
        description="The declared label set, 2 or more unique non-empty names; class index i "
        "is the name at position i. Numeric labels match their usual spelling (1.0 matches "
        '"1"). Released in place of the target column\'s values.',
        examples=[["benign", "malignant"]],
    )
    input_shape: list[Annotated[int, Field(strict=True, ge=1, le=MAX_INPUT_SIZE)]] | None = Field(
        default=None,
        min_length=1,
        max_length=3,
        description="The shape of one row's features, e.g. [1, 8, 8] for 8x8 grey images "
        "([channels, height, width]; cnn2d needs this form). Its product must equal the "
        "number of features; rows are stored flat in C order. Public metadata. An NPZ "
        "upload whose x is (n, C, H, W) or (n, H, W) declares [C, H, W] or [1, H, W] by "
        "its shape.",
        examples=[[1, 8, 8]],
    )

    bounds: list[tuple[float, float]] | None = Field(
        default=None,
        description="Each feature's clipping bounds [low, high], in feature order: public "
        "metadata the owner declares (never read off the data). The dataset's DP "
        "standardisation statistics clip to them (POST /v1/datasets/{id}/statistics); without "
        "them, bounds are estimated under DP there.",
        examples=[[[0.0, 1.0], [0.0, 8.0]]],
    )

    @field_validator("bounds")
    @classmethod
    def _bounds_are_ranges(
        cls, bounds: list[tuple[float, float]] | None
    ) -> list[tuple[float, float]] | None:
        from ppml.datasets.statistics import bounds_problem

        problem = None if bounds is None else bounds_problem(bounds, len(bounds))
        if problem is not None:
            raise ValueError(problem)
        return bounds

    @field_validator("classes")
    @classmethod
    def _names_are_distinct_labels(cls, classes: list[str]) -> list[str]:
        if any("\x00" in name for name in classes):
            raise ValueError("class names must not hold NUL characters")
        if any(not name.strip() or len(name) > MAX_CLASS_NAME for name in classes):
            raise ValueError(f"class names must be non-empty, at most {MAX_CLASS_NAME} characters")
        if len({canonical_label(name) for name in classes}) != len(classes):
            raise ValueError("class names must be unique (1 and 1.0 name the same label)")
        return classes


def parse_schema(text: str, *, max_classes: int) -> DatasetSchema:
    """Parses the JSON text of an upload's ``schema`` field.

    Args:
        text: A JSON object such as ``{"classes": ["benign", "malignant"]}``.
        max_classes: The most classes a dataset may declare.

    Returns:
        The validated schema.

    Raises:
        InvalidInput: Invalid JSON or schema (``field="schema"``).
    """
    try:
        schema = DatasetSchema.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "schema"
        named = first["loc"][:1]
        raise InvalidInput(
            f'schema must be a JSON object like {{"classes": ["a", "b"]}}: {where}: {first["msg"]}',
            field=f"schema.{named[0]}" if named in (("input_shape",), ("bounds",)) else "schema",
        ) from None
    if len(schema.classes) > max_classes:
        raise InvalidInput(
            f"schema.classes declares more than {max_classes} classes", field="schema"
        )
    return schema


def check_input_shape(input_shape: Sequence[int] | None, num_features: int) -> None:
    """A declared input shape must hold exactly the data's features.

    Raises:
        InvalidInput: ``field="schema.input_shape"``.
    """
    if input_shape is not None and math.prod(input_shape) != num_features:
        raise InvalidInput(
            f"schema.input_shape {list(input_shape)} holds {math.prod(input_shape)} values per "
            f"row; the data has {num_features} features",
            field="schema.input_shape",
        )


def check_bounds(schema: DatasetSchema | None, num_features: int) -> None:
    """Declared bounds must give one pair per feature.

    Raises:
        InvalidInput: ``field="schema.bounds"``.
    """
    if schema is not None and schema.bounds is not None and len(schema.bounds) != num_features:
        raise InvalidInput(
            f"schema.bounds declares {len(schema.bounds)} pairs; the data has {num_features} "
            "features",
            field="schema.bounds",
        )


def canonical_label(value: object) -> str:
    """The spelling a label is matched by: integers and integer-valued floats as ``"1"``,
    other numbers by their shortest repr, booleans as ``"True"``/``"False"``, other
    strings as given (numeric-looking strings as their number)."""
    if isinstance(value, bool | np.bool_):
        return "True" if value else "False"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return _canonical_float(float(str(value)))  # str: numpy's shortest form per dtype
    text = str(value)
    if text.lower() in ("true", "false"):
        return text.capitalize()
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        return _canonical_float(float(text))
    except ValueError:
        return text


def _canonical_float(number: float) -> str:
    if not math.isfinite(number):
        return repr(number)
    return str(int(number)) if number.is_integer() else repr(number)


def declared_bounds(data_schema: dict[str, Any] | None) -> list[tuple[float, float]] | None:
    """The per-feature bounds a stored schema declares, or None."""
    found = (data_schema or {}).get("bounds")
    return None if found is None else [(float(lo), float(hi)) for lo, hi in found]
