"""MST (McKenna, Miklau and Sheldon 2021): DP synthetic data from noisy 1- and 2-way marginals.

The mechanism spends rho (zCDP, add/remove neighbours) in three equal parts:

1. all 1-way marginals, one Gaussian measurement: the concatenated counts move by one in each
   of the ``d`` columns when a record is added or removed, so their L2 sensitivity is √d;
2. a maximum spanning tree over the columns, ``d − 1`` exponential-mechanism picks of an
   edge, scored by the L1 error of the independence estimate of its 2-way marginal
   (sensitivity 1), each ε-DP and so ε²/8-zCDP;
3. the ``d − 1`` chosen 2-way marginals, one Gaussian measurement of L2 sensitivity √(d−1).

Cells of a column whose noisy count falls under 3σ are merged before the selection (a
function of the noisy counts only). ``mbi`` (private-pgm's engine) estimates a graphical
model from the measurements and samples the rows from it. Everything after the measurements
is post-processing. Every random draw comes from the caller's generator, and ``mbi``'s own
sampling from NumPy's global one, which :func:`synthesize` seeds from it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ppml.synthesis.table import exponential_mechanism

__all__ = ["Spend", "load_mbi", "synthesize"]

#: Mirror-descent iterations of the final estimate and of the selection's estimate.
ESTIMATE_ITERS = 1000
SELECT_ITERS = 250


@dataclass(frozen=True, kw_only=True)
class Spend:
    """One step of the mechanism and the zCDP rho it spent."""

    step: str
    rho: float
    sigma: float | None = None  # σ of a Gaussian measurement
    epsilon: float | None = None  # ε of each exponential-mechanism draw


def load_mbi() -> Any:
    """The ``mbi`` module, with JAX in float64 and its compilation cache off (both as mbi's
    authors advise)."""
    import jax

    jax.config.update("jax_enable_x64", True)  # type: ignore[no-untyped-call]
    jax.config.update("jax_enable_compilation_cache", False)  # type: ignore[no-untyped-call]
    import mbi  # type: ignore[import-untyped]

    return mbi


def _measure(
    data: Any, cliques: Sequence[tuple[str, ...]], sigma: float, rng: np.random.Generator
) -> list[Any]:
    mbi = load_mbi()
    out = []
    for clique in cliques:
        counts = np.asarray(data.project(clique).datavector(), dtype=np.float64)
        noisy = counts + rng.normal(0.0, sigma, size=counts.size)
        out.append(mbi.LinearMeasurement(noisy, clique, stddev=sigma))
    return out


def _compression(one_way: Sequence[Any], sigma: float) -> dict[str, np.ndarray]:
    """Per column, the cells kept (noisy count ≥ 3σ) and one cell for the rest."""
    mapping: dict[str, np.ndarray] = {}
    for m in one_way:
        keep = np.asarray(m.noisy_measurement) >= 3 * sigma
        if keep.all():
            continue
        index = np.cumsum(keep) - 1
        mapping[m.clique[0]] = np.where(keep, index, int(keep.sum())).astype(np.int64)
    return mapping


def _tree(
    data: Any, model: Any, attrs: Sequence[str], epsilon: float, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """Kruskal's algorithm with each edge drawn by the exponential mechanism.

    ``model`` was fitted to the 1-way measurements alone, so it is a product distribution:
    its 2-way marginal is the outer product of its 1-way ones (no inference per pair)."""
    total = float(model.total)
    fitted = {a: np.asarray(model.project((a,)).datavector(), dtype=np.float64) for a in attrs}
    scores = {}
    for a, b in itertools.combinations(attrs, 2):
        real = np.asarray(data.project((a, b)).datavector(), dtype=np.float64)
        independent = np.outer(fitted[a], fitted[b]).ravel() / total
        scores[a, b] = float(np.abs(real - independent).sum())
    parent = {a: a for a in attrs}

    def root(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    edges: list[tuple[str, str]] = []
    for _ in range(len(attrs) - 1):
        candidates = [e for e in scores if root(e[0]) != root(e[1])]
        pick = candidates[
            exponential_mechanism(np.array([scores[e] for e in candidates]), epsilon, rng)
        ]
        parent[root(pick[0])] = root(pick[1])
        edges.append(pick)
    return edges


def synthesize(
    columns: Mapping[str, np.ndarray],
    sizes: Sequence[int],
    *,
    rho: float,
    rows: int,
    rng: np.random.Generator,
    iters: int = ESTIMATE_ITERS,
) -> tuple[dict[str, np.ndarray], list[Spend]]:
    """``rows`` synthetic records of the discrete table ``columns`` (one array per column, in
    order, with ``sizes`` values each), rho-zCDP. Returns the records and what each step spent
    (their rho sum to at most ``rho``)."""
    if rho <= 0 or rows < 1:
        raise ValueError("rho and rows must be positive")
    mbi = load_mbi()
    attrs = tuple(columns)
    d = len(attrs)
    domain = mbi.Domain(attrs, tuple(int(s) for s in sizes))
    data = mbi.Dataset({a: np.asarray(columns[a]) for a in attrs}, domain)
    part = rho / 3 if d > 1 else rho
    np.random.seed(int(rng.integers(2**32)))  # mbi samples rows and decompresses with it

    sigma1 = math.sqrt(d / (2 * part))
    spends = [Spend(step="one-way marginals", rho=d / (2 * sigma1**2), sigma=sigma1)]
    one_way = _measure(data, [(a,) for a in attrs], sigma1, rng)
    mapping = _compression(one_way, sigma1)
    small = data.compress(mapping) if mapping else data
    measured = [m.compress(mapping, domain) for m in one_way]
    estimator = mbi.estimation.MirrorDescent()
    if d > 1:
        epsilon = math.sqrt(8 * part / (d - 1))
        independent = estimator.estimate(small.domain, measured, iters=SELECT_ITERS)
        edges = _tree(small, independent, attrs, epsilon, rng)
        spends.append(Spend(step="tree selection", rho=(d - 1) * epsilon**2 / 8, epsilon=epsilon))
        sigma2 = math.sqrt((d - 1) / (2 * part))
        measured += _measure(small, edges, sigma2, rng)
        spends.append(Spend(step="two-way marginals", rho=(d - 1) / (2 * sigma2**2), sigma=sigma2))
    model = estimator.estimate(small.domain, measured, iters=iters)
    synthetic = model.synthetic_data(rows)
    if mapping:
        synthetic = synthetic.decompress(mapping)
    return {a: np.asarray(synthetic.data[a], dtype=np.int64) for a in attrs}, spends
