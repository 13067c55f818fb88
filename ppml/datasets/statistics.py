"""DP standardisation statistics of a tabular dataset: released once, reused by every job.

Each feature j is clipped to bounds ``[lo_j, hi_j]`` fixed before the data is read, then
rescaled to ``z_j = (clip(x_j) - c_j) / r_j`` in ``[-1, 1]`` (``c_j`` the bounds' midpoint,
``r_j`` their half-width). One record contributes the vector ``(z, z²)`` of ``2d`` values,
each of magnitude at most 1, so adding or removing a record moves the sums
``(Σ z, Σ z²)`` by at most ``sqrt(2d)`` in L2. The Gaussian mechanism with noise ``σ`` on
every coordinate is then ``rho = 2d / (2σ²) = d / σ²`` zCDP, i.e. ``(α, α·rho)``-RDP at
every order (docs/privacy.md, "Dataset statistics"). Means and standard deviations are
post-processing of the noisy sums and the public training-row count.

Bounds come from the owner (declared schema or the request), from a built-in's published
documentation, or from :func:`ppml.synthesis.table.dp_bounds` (a Gaussian histogram,
``rho_bounds``-zCDP). Pure numpy and pydantic: the API imports the record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BOUNDS_SHARE",
    "MECHANISM",
    "DatasetStatistics",
    "bounds_problem",
    "clipped_sums",
    "moments_sigma",
    "release_moments",
    "standardize",
]

MECHANISM = "standardize"
#: Share of the statistics' rho spent on DP bounds when no bounds are declared. Bounds need
#: only coarse cells (decades of a log grid), the moments' error shrinks with their own rho.
BOUNDS_SHARE = 0.25
#: Smallest released standard deviation, as a fraction of a feature's half-width: noise may
#: make the variance estimate ≤ 0, and a division by ~0 would blow the feature up.
MIN_STD_FRACTION = 1e-3
#: Largest magnitude of a declared bound (float32 models must represent the scaled values).
MAX_BOUND = 1e12


class DatasetStatistics(BaseModel):
    """A dataset's standardisation statistics: the charge's plan, then the released values.

    ``status`` is ``pending`` from the charge until the worker of the first job that uses
    them computes them (the noise is drawn there, where the data is read), then ``ready``.
    """

    model_config = ConfigDict(extra="forbid")

    status: Literal["pending", "ready"]
    epsilon: float | None = Field(
        description="ε of the release alone at the dataset's δ (null on public data)."
    )
    rho: float = Field(ge=0, description="zCDP rho of the whole release (bounds and moments).")
    rho_bounds: float = Field(ge=0, description="The part of rho spent on DP bounds (0: none).")
    noise_std: float = Field(
        ge=0, description="σ of the Gaussian noise on each clipped, rescaled sum (0: exact)."
    )
    sensitivity: float = Field(gt=0, description="L2 sensitivity of the sums: sqrt(2d).")
    bounds_source: Literal["declared", "builtin", "dp"]
    bounds: list[tuple[float, float]] | None = Field(
        description="Each feature's clipping bounds [low, high] (DP ones appear when ready)."
    )
    mean: list[float] | None = None
    std: list[float] | None = None
    ledger_entry_id: str | None = None


def bounds_problem(bounds: Sequence[Sequence[float]], num_features: int) -> str | None:
    """Why declared bounds are unusable (a message for a 422), or None."""
    if len(bounds) != num_features:
        return f"bounds must hold one [low, high] pair per feature ({num_features})"
    for j, pair in enumerate(bounds):
        if len(pair) != 2:
            return f"bounds[{j}] must be a [low, high] pair"
        low, high = float(pair[0]), float(pair[1])
        if not (math.isfinite(low) and math.isfinite(high)):
            return f"bounds[{j}] must be finite numbers"
        if max(abs(low), abs(high)) > MAX_BOUND:
            return f"bounds[{j}] must lie within ±{MAX_BOUND:g}"
        if not low < high:
            return f"bounds[{j}]: low must be below high"
    return None


def moments_sigma(num_features: int, rho: float) -> float:
    """σ of the Gaussian noise on the ``2d`` rescaled sums that spends ``rho`` (zCDP)."""
    if rho <= 0:
        raise ValueError("rho must be positive")
    sigma = math.sqrt(num_features / rho)
    # Rounded up, checked exactly: the release must never spend more than the rho charged.
    while Fraction(num_features) / Fraction(sigma) ** 2 > Fraction(rho):
        sigma = math.nextafter(sigma, math.inf)
    return sigma


def _rescaled(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    low, high = bounds[:, 0], bounds[:, 1]
    centre, half = (low + high) / 2, (high - low) / 2
    z: np.ndarray = (np.clip(x.astype(np.float64), low, high) - centre) / half
    return z


def clipped_sums(x: np.ndarray, bounds: Sequence[tuple[float, float]]) -> np.ndarray:
    """The ``2d`` sums ``(Σ z, Σ z²)`` of the rows clipped and rescaled to ``[-1, 1]``: what
    the Gaussian mechanism perturbs (one row moves them by at most ``sqrt(2d)`` in L2)."""
    z = _rescaled(x, np.asarray(bounds, dtype=np.float64))
    sums: np.ndarray = np.concatenate([z.sum(axis=0), (z * z).sum(axis=0)])
    return sums


def release_moments(
    x: np.ndarray, bounds: Sequence[tuple[float, float]], sigma: float, rng: np.random.Generator
) -> tuple[list[float], list[float]]:
    """DP means and standard deviations of the clipped features (the Gaussian mechanism on
    the sums of ``z`` and ``z²``, σ = ``sigma``; 0: exact, for public data).

    Only the clipped values enter the sums; ``len(x)`` is the public training-row count.
    """
    edges = np.asarray(bounds, dtype=np.float64)
    sums = clipped_sums(x, bounds)
    d, n = edges.shape[0], max(len(x), 1)
    noisy = sums + (rng.normal(0.0, sigma, 2 * d) if sigma > 0 else 0.0)
    mean_z = np.clip(noisy[:d] / n, -1.0, 1.0)
    var_z = noisy[d:] / n - mean_z**2
    # Floored at the noise's own scale in the variance (σ/n): below it the estimate says
    # nothing, and dividing by it would blow the feature up (post-processing: σ, n public).
    floor = max(MIN_STD_FRACTION**2, sigma / n)
    std_z = np.sqrt(np.clip(var_z, min(floor, 1.0), 1.0))
    centre, half = (edges[:, 0] + edges[:, 1]) / 2, (edges[:, 1] - edges[:, 0]) / 2
    return (centre + half * mean_z).tolist(), (half * std_z).tolist()


def standardize(x: np.ndarray, stats: DatasetStatistics) -> np.ndarray:
    """Rows clipped to the released bounds, centred by the released means and divided by
    the released standard deviations (float32), as the exported model does it."""
    assert stats.bounds is not None and stats.mean is not None and stats.std is not None
    edges = np.asarray(stats.bounds, dtype=np.float32)
    clipped = np.clip(x.astype(np.float32), edges[:, 0], edges[:, 1])
    mean = np.asarray(stats.mean, dtype=np.float32)
    return np.ascontiguousarray((clipped - mean) / np.asarray(stats.std, dtype=np.float32))
