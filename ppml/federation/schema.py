"""The schema a federation declares and every node's data must match."""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from ppml.datasets.schema import DatasetSchema

__all__ = ["MAX_FEATURE_NAME", "FederationSchema"]

MAX_FEATURE_NAME = 200


class FederationSchema(DatasetSchema):
    """A dataset schema (classes, input_shape, bounds) plus the feature columns' names.

    A node's file must hold the ``features`` columns (CSV, Parquet) or an ``x`` array of
    ``input_shape`` (NPZ), and labels among ``classes``. One of the two is required.
    """

    features: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=100_000,
        description="Names of the feature columns, in order (tabular data).",
        examples=[["age", "income"]],
    )

    @model_validator(mode="after")
    def _features_or_shape(self) -> FederationSchema:
        if self.features is None and self.input_shape is None:
            raise ValueError("a federation's schema needs features (column names) or input_shape")
        if self.features is not None:
            if any(
                not f.strip() or len(f) > MAX_FEATURE_NAME or "\x00" in f for f in self.features
            ):
                raise ValueError(
                    f"feature names must be non-empty, at most {MAX_FEATURE_NAME} characters"
                )
            if len(set(self.features)) != len(self.features):
                raise ValueError("feature names must be unique")
            if self.input_shape is not None and math.prod(self.input_shape) != len(self.features):
                raise ValueError("input_shape must hold exactly the named features")
        if self.bounds is not None and len(self.bounds) != self.num_features:
            raise ValueError("bounds must give one range per feature")
        return self

    @property
    def num_features(self) -> int:
        if self.features is not None:
            return len(self.features)
        assert self.input_shape is not None
        return math.prod(self.input_shape)
