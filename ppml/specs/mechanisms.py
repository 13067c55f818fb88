"""The specs of the mechanisms that are not DP-SGD training: a DP synthetic table
(``kind: synthesize``) and private prediction with PATE (``kind: pate``)."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import Field, model_validator

from ppml.specs.base import Spec

__all__ = ["PateSpec", "StudentSpec", "SynthesizeSpec"]


class SynthesizeSpec(Spec):
    """A DP synthetic table of the dataset (``kind: synthesize``): MST over binned features
    and the label (docs/mechanisms.md)."""

    rows: int | None = Field(
        strict=True,
        default=None,
        ge=1,
        le=1_000_000,
        description="Synthetic rows to produce; default: as many as the training rows.",
    )
    bins: int = Field(
        strict=True, default=8, ge=2, le=64, description="Equal-width bins per feature."
    )
    features: list[Annotated[int, Field(strict=True, ge=0)]] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Indices of the features to synthesize (the label always is); default all.",
    )
    bounds: dict[int, tuple[float, float]] = Field(
        default_factory=dict,
        description="[low, high] of a feature, by index, to bin it on (values are clipped). "
        "Features without bounds here use the built-in dataset's documented range, or bounds "
        "estimated under DP (charged with the job).",
    )

    @model_validator(mode="after")
    def _valid(self) -> SynthesizeSpec:
        if self.features is not None and len(set(self.features)) != len(self.features):
            raise ValueError("features must not repeat")
        for index, (low, high) in (self.bounds or {}).items():
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"bounds of feature {index} must be finite with low < high")
        return self


class StudentSpec(Spec):
    """A student model trained by a pate job on public rows its teachers label (GNMax)."""

    public_dataset_id: str = Field(
        min_length=1,
        max_length=40,
        description="A public dataset (no budget) of the tenant with the same features: its "
        "rows, in order, are the student's inputs; its labels are never read.",
    )
    queries: int = Field(
        strict=True,
        ge=1,
        le=100_000,
        description="How many of those rows the teachers label (the first ones, train split "
        "then test split): the student's cost is this many answers, reserved at admission.",
    )


class PateSpec(Spec):
    """Private prediction with PATE (``kind: pate``): ``teachers`` models trained without DP
    on disjoint partitions of the training records, answering through the Gaussian noisy
    argmax of their votes (GNMax), each answer charged (docs/mechanisms.md). Name the noise
    either as ``sigma`` or as the ε of one answer (``query_epsilon``, at the dataset's δ)."""

    teachers: int = Field(
        strict=True, ge=2, le=1000, description="Teachers k: disjoint partitions, one model each."
    )
    sigma: float | None = Field(
        strict=True,
        default=None,
        ge=0.5,
        le=1e6,
        description="Standard deviation of the Gaussian noise added to each class's vote count "
        "(GNMax). One answer costs the RDP curve α/sigma² (zCDP rho = 1/sigma²).",
    )
    query_epsilon: float | None = Field(
        strict=True,
        default=None,
        ge=1e-3,
        le=100,
        description="Instead of sigma: the ε of one answer at the dataset's δ; sigma is the "
        "smallest whose one-answer curve converts to at most this ε.",
    )

    student: StudentSpec | None = Field(
        default=None,
        description="Train and release a student model on public rows labelled by the "
        "teachers; null: the teachers only answer POST /v1/jobs/{id}/predict.",
    )

    @model_validator(mode="after")
    def _one_noise(self) -> PateSpec:
        if (self.sigma is None) == (self.query_epsilon is None):
            raise ValueError("set exactly one of sigma and query_epsilon")
        return self
