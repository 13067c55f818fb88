"""A dataset's table as MST sees it: every feature binned on bounds fixed before the data is
read, and the label as its declared classes.

Bounds come, in order, from the job's spec (``synthesize.bounds``, given by whoever submits
it), from the built-in dataset's published documentation (digits: the pixel range;
breast_cancer: the UCI summary statistics that ship with scikit-learn), or are estimated
under DP (:func:`dp_bounds`, charged as part of the job). Binning is then a function of each
record alone, so the neighbouring relation is unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LABEL",
    "Table",
    "builtin_bounds",
    "dp_bounds",
    "exponential_mechanism",
]

#: The label column's name in the table and in the synthetic CSV.
LABEL = "label"
#: Cell edges of the DP estimate: a fixed grid, symmetric in sign, log-spaced in size.
_GRID = np.concatenate([-np.geomspace(1e6, 1e-6, 120), [0.0], np.geomspace(1e-6, 1e6, 120)])


@dataclass(frozen=True, kw_only=True)
class Table:
    """Binned view of a dataset: one integer column per feature, then the label."""

    names: tuple[str, ...]  # feature names, then LABEL
    bounds: tuple[tuple[float, float], ...]  # one per feature
    bins: int
    classes: tuple[str, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.bins,) * len(self.bounds) + (len(self.classes),)

    def encode(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Each record's bin per feature (values clipped to the bounds) and its class."""
        columns: dict[str, np.ndarray] = {}
        for j, (lo, hi) in enumerate(self.bounds):
            scaled = (np.clip(x[:, j], lo, hi) - lo) / (hi - lo) * self.bins
            columns[self.names[j]] = np.minimum(scaled.astype(np.int64), self.bins - 1)
        columns[LABEL] = np.asarray(y, dtype=np.int64)
        return columns

    def decode(self, columns: Mapping[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """Feature values of binned records: uniform within each record's bin."""
        n = len(columns[LABEL])
        x = np.empty((n, len(self.bounds)), dtype=np.float64)
        for j, (lo, hi) in enumerate(self.bounds):
            width = (hi - lo) / self.bins
            x[:, j] = lo + (np.asarray(columns[self.names[j]]) + rng.random(n)) * width
        return x


def builtin_bounds(builtin: str | None, names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Bounds a built-in dataset's documentation declares, in the units ppml stores."""
    if builtin == "digits":  # pixels 0..16, stored divided by 16
        return {name: (0.0, 1.0) for name in names}
    if builtin != "breast_cancer":
        return {}
    from sklearn.datasets import load_breast_cancer

    # The "Summary Statistics" table of the dataset's description: min and max per feature,
    # in the order of feature_names, rounded (so widened by 1% and half a unit of the last
    # printed digit); stored values are log1p of the raw ones, which are non-negative.
    rows = re.findall(r"^[a-z ()]+:\s+([0-9.]+)\s+([0-9.]+)\s*$", load_breast_cancer().DESCR, re.M)
    if len(rows) != len(names):
        return {}
    return {
        name: (math.log1p(max(0.0, 0.99 * float(lo) - 5e-4)), math.log1p(1.01 * float(hi) + 5e-4))
        for name, (lo, hi) in zip(names, rows, strict=True)
    }


def exponential_mechanism(
    scores: np.ndarray, epsilon: float, rng: np.random.Generator, *, sensitivity: float = 1.0
) -> int:
    """Index drawn with probability ∝ exp(ε·score / (2Δ)): ε-DP, hence ε²/8-zCDP
    (Cesar and Rogers 2021)."""
    logits = epsilon * np.asarray(scores, dtype=np.float64) / (2 * sensitivity)
    logits -= logits.max()
    weights = np.exp(logits)
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def dp_bounds(
    x: np.ndarray, columns: Sequence[int], rho: float, rng: np.random.Generator
) -> dict[int, tuple[float, float]]:
    """Each column's range from a Gaussian histogram over a fixed grid (rho-zCDP): every
    record adds one count to one cell of each of the ``k`` columns, so the histograms' joint
    L2 sensitivity is sqrt(k) and sigma = sqrt(k / (2 rho)). A column's bounds are the outer
    edges of its cells whose noisy count reaches 3 sigma (post-processing); with none, the
    edges of its largest noisy cell. An unbounded outer cell alone gives its grid
    neighbour's edges, so low < high always."""
    if not columns:
        return {}
    sigma = math.sqrt(len(columns) / (2 * rho))
    found: dict[int, tuple[float, float]] = {}
    edges = np.concatenate([[-np.inf], _GRID, [np.inf]])
    for j in columns:
        cells = np.searchsorted(_GRID, x[:, j], side="right")  # cell i: [edges[i], edges[i+1])
        counts = np.bincount(cells, minlength=len(_GRID) + 1).astype(np.float64)
        noisy = counts + rng.normal(0.0, sigma, counts.size)
        kept = np.flatnonzero(noisy >= 3 * sigma)
        first, last = (kept[0], kept[-1]) if kept.size else (int(noisy.argmax()),) * 2
        low = edges[first] if np.isfinite(edges[first]) else _GRID[0]
        high = edges[last + 1] if np.isfinite(edges[last + 1]) else _GRID[-1]
        if high <= low:  # only an outer, unbounded cell kept: widen to its grid neighbour
            low, high = (_GRID[-2], _GRID[-1]) if low >= _GRID[-1] else (_GRID[0], _GRID[1])
        found[j] = (float(low), float(high))
    return found
