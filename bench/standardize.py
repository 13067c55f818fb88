"""DP logistic regression with and without the dataset's DP standardisation, at one total ε.

Each arm is the service's code: ``ppml.datasets.statistics`` (and
``ppml.synthesis.table.dp_bounds`` where no bounds are public) for the statistics, and
``ppml.training.dp_sgd.train`` for DP-SGD, σ calibrated with the ledger's accounting.

* ``raw``: DP-SGD at ε on the features as stored.
* ``std ε_s``: the statistics released at ε_s, then DP-SGD with the largest σ-target whose
  curve, composed with the statistics' curve on the ledger's grid, converts to at most the
  total ε at δ = 1e-5. The total includes the statistics' cost.

Bounds: breast_cancer's documented ranges (``builtin_bounds``, as the service uses them);
on the proxies (wine, ``make_classification`` with feature scales spread over four decades)
none are public, so a quarter of ε_s's rho estimates them under DP, as the service does.
The statistics' ε_s is chosen on the proxies only; breast_cancer is reported, never tuned on.
Training settings are fixed (logreg, batch 64, lr 0.2, momentum 0.9, 30 epochs, clip 1), or
with ``--defaults`` the ones ppml chooses for a job that names none (``ppml.defaults.choose``
for the data's public metadata, standardised): the settings of the statistics-share rule
(``ppml.defaults.statistics_epsilon``, docs/defaults.md).

Usage::

    .venv/bin/python bench/standardize.py [--seeds 0 1 2] [--epsilon 1.0] [--shares 0.1 0.2 0.3]
        [--defaults] [--proxies-only]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import print_table, save
from ppml.datasets import load_builtin
from ppml.datasets import statistics as st
from ppml.defaults import PublicMetadata, choose
from ppml.privacy import accounting as acc
from ppml.privacy import calibration as cal
from ppml.privacy.zcdp import calibrate_zcdp
from ppml.services.statistics import statistics_event
from ppml.specs import ModelSpec
from ppml.synthesis.table import builtin_bounds, dp_bounds
from ppml.training.dp_sgd import DPPlan, TrainingPlan, train

DELTA = 1e-5
CLIP = 1.0


@dataclass(frozen=True)
class Steps:
    """How the logistic regression trains."""

    epochs: int = 30
    batch: int = 64
    lr: float = 0.2
    momentum: float = 0.9
    ema: float = 0.0


def chosen(split: Split, epsilon: float) -> Steps:
    """What ppml's defaults choose for a standardised table of this shape at ``epsilon``."""
    x_train, y_train, _, y_test = split
    meta = PublicMetadata(
        num_train=len(y_train), num_features=x_train.shape[1],
        num_classes=int(max(y_train.max(), y_test.max()) + 1), input_shape=None,
        epsilon=epsilon, delta=DELTA, standardised=True,
    )  # fmt: skip
    t = choose(meta).training
    return Steps(t.epochs, t.batch_size, t.learning_rate, t.momentum, t.ema_decay)


Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def proxies() -> dict[str, tuple[Split, list[tuple[float, float]] | None]]:
    """The data sets: breast_cancer (documented bounds) and two proxies (no public bounds)."""
    from sklearn.datasets import load_iris, load_wine, make_classification
    from sklearn.model_selection import train_test_split

    bc = load_builtin("breast_cancer")
    names = [f"x{j}" for j in range(bc.x_train.shape[1])]
    documented = builtin_bounds("breast_cancer", names)
    found: dict[str, tuple[Split, list[tuple[float, float]] | None]] = {
        "breast_cancer": (
            (bc.x_train, bc.y_train, bc.x_test, bc.y_test),
            [documented[n] for n in names],
        )
    }
    wine = load_wine()
    parts = train_test_split(wine.data, wine.target, test_size=0.25, random_state=0)
    found["wine (proxy)"] = (_typed(parts), None)
    # The same rows with the ranges their description publishes (as breast_cancer's are):
    # nothing of the release goes to estimating bounds.
    found["wine, documented bounds (proxy)"] = (_typed(parts), _documented(wine.DESCR, 13))
    iris = load_iris()
    parts = train_test_split(iris.data, iris.target, test_size=0.25, random_state=0)
    found["iris, documented bounds (proxy)"] = (_typed(parts), _documented(iris.DESCR, 4))
    x, y = make_classification(
        n_samples=1000, n_features=20, n_informative=8, random_state=0, class_sep=1.0
    )
    scales = np.logspace(-2, 2, x.shape[1])  # four decades of feature scales
    parts = train_test_split(x * scales + 3 * scales, y, test_size=0.25, random_state=0)
    found["make_classification (proxy)"] = (_typed(parts), None)
    return found


def _documented(descr: str, count: int) -> list[tuple[float, float]]:
    """The Min and Max columns of a scikit-learn description's summary statistics, widened
    by 1% of the range (as the built-in breast_cancer's documented bounds are)."""
    bounds: list[tuple[float, float]] = []
    for line in descr.split("Summary Statistics")[1].splitlines():
        numbers = line.partition(":")[2].split()[:2]
        if len(bounds) < count and len(numbers) == 2 and _numeric(numbers):
            low, high = float(numbers[0]), float(numbers[1])
            bounds.append((low - 0.01 * (high - low), high + 0.01 * (high - low)))
    assert len(bounds) == count, bounds
    return bounds


def _numeric(words: list[str]) -> bool:
    return all(w.replace(".", "", 1).isdigit() for w in words)


def _typed(parts: list[Any]) -> Split:
    x_train, x_test, y_train, y_test = parts
    return (
        np.ascontiguousarray(x_train, dtype=np.float32),
        np.asarray(y_train, dtype=np.int64),
        np.ascontiguousarray(x_test, dtype=np.float32),
        np.asarray(y_test, dtype=np.int64),
    )


def dp_logreg(split: Split, sigma: float, seed: int, how: Steps) -> float:
    x_train, y_train, x_test, y_test = split
    q, per_epoch, total = cal.plan_dp_sgd(
        num_records=len(y_train), batch_size=how.batch, epochs=how.epochs
    )
    plan = TrainingPlan(
        model=ModelSpec(arch="logreg"), epochs=how.epochs, batch_size=how.batch,
        learning_rate=how.lr, optimizer="sgd", momentum=how.momentum, seed=seed,
        steps_per_epoch=per_epoch, total_steps=total, ema_decay=how.ema,
    )  # fmt: skip
    result = train(
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=int(max(y_train.max(), y_test.max()) + 1), plan=plan,
        dp=DPPlan(noise_multiplier=sigma, max_grad_norm=CLIP, sample_rate=q, delta=DELTA),
        device="cpu", dp_seed=seed,
    )  # fmt: skip
    return float(result.metrics["test_accuracy"])


def job_sigma(rows: int, epsilon: float, before: acc.Curve, how: Steps) -> float:
    """Smallest σ (bisection on the job's own target) whose curve, added to ``before``,
    converts to at most ``epsilon`` at δ."""
    q, _, total = cal.plan_dp_sgd(num_records=rows, batch_size=how.batch, epochs=how.epochs)

    def composed(target: float) -> tuple[float, float]:
        sigma = cal.calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=q, steps=total)
        event = acc.MechanismEvent(sample_rate=q, noise_multiplier=sigma, steps=total)
        return acc.epsilon(acc.add(before, acc.rdp_curve(event)), DELTA), sigma

    low, high = 0.05, epsilon
    if composed(high)[0] <= epsilon:
        return composed(high)[1]
    for _ in range(25):
        mid = (low + high) / 2
        low, high = (mid, high) if composed(mid)[0] <= epsilon else (low, mid)
    return composed(low)[1]


def standardised(
    split: Split, bounds: list[tuple[float, float]] | None, eps_s: float, seed: int
) -> Split:
    """The split standardised with statistics released at ``eps_s`` (as the worker does)."""
    x_train, y_train, x_test, y_test = split
    rho = calibrate_zcdp(target_epsilon=eps_s, delta=DELTA)
    rng = np.random.default_rng(1000 + seed)
    rho_bounds = st.BOUNDS_SHARE * rho if bounds is None else 0.0
    if bounds is None:
        columns = list(range(x_train.shape[1]))
        found = dp_bounds(x_train, columns, rho_bounds, rng)
        bounds = [found[j] for j in columns]
    sigma = st.moments_sigma(x_train.shape[1], rho - rho_bounds)
    mean, std = st.release_moments(x_train, bounds, sigma, rng)
    stats = st.DatasetStatistics(
        status="ready", epsilon=eps_s, rho=rho, rho_bounds=rho_bounds, noise_std=sigma,
        sensitivity=(2.0 * x_train.shape[1]) ** 0.5, bounds_source="declared", bounds=bounds,
        mean=mean, std=std,
    )  # fmt: skip
    return st.standardize(x_train, stats), y_train, st.standardize(x_test, stats), y_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--defaults", action="store_true", help="ppml's chosen training")
    parser.add_argument("--proxies-only", action="store_true", help="leave breast_cancer out")
    args = parser.parse_args()
    started = time.perf_counter()
    rows, results = [], []
    for name, (split, bounds) in proxies().items():
        if args.proxies_only and name == "breast_cancer":
            continue
        n = len(split[1])
        arms = [("raw", None)] + [(f"std ε_s={s:g}", s) for s in args.shares]
        for arm, share in arms:
            before = acc.zero()
            if share is not None:
                rho = calibrate_zcdp(target_epsilon=share, delta=DELTA)
                before = acc.rdp_curve(statistics_event(rho))
            job_epsilon = args.epsilon - (share or 0.0)
            how = chosen(split, job_epsilon) if args.defaults else Steps()
            sigma = job_sigma(n, args.epsilon, before, how)
            total = acc.epsilon(
                acc.add(before, acc.rdp_curve(acc.MechanismEvent(
                    sample_rate=how.batch / n, noise_multiplier=sigma,
                    steps=how.epochs * -(-n // how.batch)))), DELTA,
            )  # fmt: skip
            scores = []
            for seed in args.seeds:
                data = split if share is None else standardised(split, bounds, share, seed)
                scores.append(dp_logreg(data, sigma, seed, how))
            mean, spread = float(np.mean(scores)), float(np.std(scores))
            rows.append([name, arm, f"{total:.3f}", f"{sigma:.2f}", f"{mean:.3f} ± {spread:.3f}"])
            results.append(
                {"data": name, "arm": arm, "epsilon_total": total, "sigma": sigma,
                 "accuracies": scores, "mean": mean, "std": spread}
            )  # fmt: skip
    print_table(
        f"DP logreg at total ε ≤ {args.epsilon:g} (δ = 1e-5), seeds {args.seeds}",
        ["data", "arm", "ε total", "σ job", "accuracy (mean ± sd)"],
        rows,
    )
    print(f"\n{time.perf_counter() - started:.0f} s")
    save("standardize", {"epsilon": args.epsilon, "seeds": args.seeds, "results": results})


if __name__ == "__main__":
    main()
