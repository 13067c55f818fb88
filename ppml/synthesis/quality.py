"""The quality report of a synthetic table.

Two parts, for two audiences (docs/privacy.md):

* ``synthetic`` is computed on the synthetic rows alone (post-processing of the DP release):
  per column, the share of its declared cells (bins, classes) the synthetic rows cover;
  every key of the tenant may read it;
* ``private`` compares with the private rows: the total-variation distance of every 1- and
  2-way marginal (on the training rows MST read) and the accuracy of a classifier trained on
  the synthetic rows and tested on the held-out rows (train-synthetic-test-real), with the
  same classifier trained on the real training rows for reference. Exact statistics of the
  private data: the dataset's owner only.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["coverage", "marginal_distances", "quality_report", "tstr_accuracy"]


def coverage(columns: Mapping[str, np.ndarray], sizes: Sequence[int]) -> dict[str, Any]:
    """Share of each column's declared cells that some synthetic row takes."""
    per_column = {
        name: float(len(np.unique(values)) / size)
        for (name, values), size in zip(columns.items(), sizes, strict=True)
    }
    return {"mean": float(np.mean(list(per_column.values()))), "columns": per_column}


def _marginal(columns: Sequence[np.ndarray], sizes: Sequence[int]) -> np.ndarray:
    flat = np.ravel_multi_index(tuple(columns), tuple(sizes))
    counts = np.bincount(flat, minlength=int(np.prod(sizes))).astype(np.float64)
    total: float = max(float(counts.sum()), 1.0)
    return np.asarray(counts / total, dtype=np.float64)


def marginal_distances(
    real: Mapping[str, np.ndarray], synthetic: Mapping[str, np.ndarray], sizes: Sequence[int]
) -> dict[str, float]:
    """Mean and max total-variation distance of all 1-way and all 2-way marginals."""
    names = list(real)
    size = dict(zip(names, sizes, strict=True))

    def tv(cols: tuple[str, ...]) -> float:
        shape = [size[c] for c in cols]
        p = _marginal([real[c] for c in cols], shape)
        q = _marginal([synthetic[c] for c in cols], shape)
        return float(0.5 * np.abs(p - q).sum())

    one = [tv((c,)) for c in names]
    two = [tv(pair) for pair in itertools.combinations(names, 2)] or [0.0]
    return {
        "tv_1way_mean": float(np.mean(one)),
        "tv_1way_max": float(np.max(one)),
        "tv_2way_mean": float(np.mean(two)),
        "tv_2way_max": float(np.max(two)),
    }


def tstr_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> float | None:
    """Accuracy on ``(x_test, y_test)`` of a logistic regression fitted to the training
    rows; None when they hold a single class (nothing to fit)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2 or len(y_test) == 0:
        return None
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(x_train, y_train)
    return float(model.score(x_test, y_test))


def quality_report(
    *,
    real: Mapping[str, np.ndarray],
    synthetic: Mapping[str, np.ndarray],
    sizes: Sequence[int],
    xy_synthetic: tuple[np.ndarray, np.ndarray],
    xy_train: tuple[np.ndarray, np.ndarray],
    xy_test: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """The report's two parts (see the module docstring): binned ``real`` training rows and
    ``synthetic`` rows, and the decoded features with labels for the classifiers."""
    x_test, y_test = xy_test
    return {
        "synthetic": {"rows": len(xy_synthetic[1]), "coverage": coverage(synthetic, sizes)},
        "private": {
            **marginal_distances(real, synthetic, sizes),
            "tstr_accuracy": tstr_accuracy(*xy_synthetic, x_test, y_test),
            "trtr_accuracy": tstr_accuracy(*xy_train, x_test, y_test),
            "test_rows": len(y_test),
        },
    }
