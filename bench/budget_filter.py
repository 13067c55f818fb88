"""How much of a budget the admission filter lets jobs use: candidate filters side by side.

    python bench/budget_filter.py [--json PATH]

A filter splits the budget's δ over the RDP orders (ppml/privacy/filters.py). For each
candidate it prints:

* ``single@ε_B``: the largest target ε of one job on a fresh budget of ε_B (1, 3, 8), as a
  fraction of ε_B, found by bisection on the target (to 0.1%), each target priced exactly as
  admission prices it (``ppml.services.pricing.price``, metrics included);
* ``4×3``, ``10×1``: the least ε_total on which 4 jobs of ε = 3 (10 of ε = 1) are all
  admitted, one after the other (0.01 steps upwards).

Job shapes (δ = 1e-5, logreg, 30 epochs unless stated): ``digits`` (1438 training rows,
batch 256), ``mnist1d`` (4000, batch 512), ``breast`` (455, batch 128), ``full-batch`` (1438
rows, batch 1438, 100 epochs), ``small-q`` (60000 rows, batch 256, 10 epochs: σ < 1 at ε ≥ 3,
whose curves blow up past a low order), ``tiny`` (1438 rows, batch 64, 2 epochs) and
``mnist-1-epoch`` (60000 rows, batch 256, 1 epoch: σ far below 1). Candidates: ``uniform``
(today: δ/20 at each order), ``first-job`` (all of δ at the first job's best order),
``budget order`` (all of δ at the budget's anchor order), ``anchor 3/5, neighbours 3/20``
(the rest evenly) and ``anchored-v1`` (ppml's new default: 2/5 at the anchor, 1/2 at the
order below it, 1/10 evenly over the rest). Results go to ``bench/results/budget_filter.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table, save

from ppml.config import get_settings
from ppml.db.models import Dataset, DatasetStatus
from ppml.privacy import accounting as acc
from ppml.privacy import filters
from ppml.services.pricing import price
from ppml.specs import JobSpec

DELTA = 1e-5
BUDGETS = (1.0, 3.0, 8.0)
#: name → (training rows, test rows, batch, epochs)
SHAPES = {
    "digits": (1438, 359, 256, 30),
    "mnist1d": (4000, 1000, 512, 30),
    "breast": (455, 114, 128, 30),
    "full-batch": (1438, 359, 1438, 100),
    "small-q": (60000, 10000, 256, 10),
    "tiny": (1438, 359, 64, 2),
    "mnist-1-epoch": (60000, 10000, 256, 1),
}
L = len(acc.ORDERS)

#: A candidate: (ε_total, the first job's curve) → share of δ at each order.
Weights = Callable[[float, acc.Curve], Sequence[Fraction]]


def _only(index: int) -> list[Fraction]:
    return [Fraction(1) if i == index else Fraction(0) for i in range(L)]


def _anchor_index(epsilon_total: float) -> int:
    return acc.ORDERS.index(filters.anchor_order(epsilon_total, DELTA))


def _first_job(_eps: float, first: acc.Curve) -> list[Fraction]:
    offsets = [
        v / acc.UNITS_PER_NAT + filters.offset(a, DELTA)
        for a, v in zip(acc.ORDERS, first, strict=True)
    ]
    return _only(min(range(L), key=offsets.__getitem__))


def _window(eps: float, _first: acc.Curve) -> list[Fraction]:
    """3/5 at the anchor, 3/20 at each neighbour, the rest evenly (an earlier draft)."""
    index = _anchor_index(eps)
    shares = {index: Fraction(3, 5), index - 1: Fraction(3, 20), index + 1: Fraction(3, 20)}
    shares = {i: w for i, w in shares.items() if 0 <= i < L}
    rest = (1 - sum(shares.values())) / (L - len(shares))
    return [shares.get(i, rest) for i in range(L)]


CANDIDATES: dict[str, Weights] = {
    "uniform (today)": lambda _e, _f: [Fraction(1, L)] * L,
    "first-job order": _first_job,
    "budget order": lambda e, _f: _only(_anchor_index(e)),
    "anchor 3/5, neighbours 3/20": _window,
    "anchored-v1 (new)": lambda e, _f: filters.anchored_weights(filters.anchor_order(e, DELTA)),
}


def caps(weights: Sequence[Fraction], epsilon_total: float) -> acc.Curve:
    """Caps of a weighted filter (zero weight: the order admits nothing)."""
    return tuple(
        math.floor(
            Fraction(epsilon_total - filters.offset(a, float(w) * DELTA)) * acc.UNITS_PER_NAT
        )
        if w > 0
        else -1
        for a, w in zip(acc.ORDERS, weights, strict=True)
    )


def dataset(rows: int, test: int) -> Dataset:
    return Dataset(
        id="bench",
        tenant_id="bench",
        name="bench",
        source={"builtin": "digits"},
        task="classification",
        num_features=64,
        num_classes=10,
        num_train=rows,
        num_test=test,
        num_clients=None,
        classes={"labels": list(range(10))},
        privacy_unit="record",
        epsilon_total=100.0,
        delta_total=DELTA,
        storage_key="none",
        status=DatasetStatus.READY,
    )


@cache
def job_curve(shape: str, target: float) -> acc.Curve:
    """The curve admission charges for a job of this shape and target ε."""
    rows, test, batch, epochs = SHAPES[shape]
    spec = JobSpec.model_validate(
        {
            "name": "bench",
            "dataset_id": "bench",
            "model": {"arch": "logreg"},
            "training": {"epochs": epochs, "batch_size": batch, "learning_rate": 1.0},
            "privacy": {"target_epsilon": target, "delta": DELTA},
        }
    )
    event = price(spec, dataset(rows, test), get_settings()).event
    assert event is not None
    return acc.rdp_curve(event)


def largest_single(weights: Weights, shape: str, budget: float) -> float:
    """Largest fraction of a fresh budget one job of this shape is admitted at."""
    low, high = 0.5, 1.0
    if acc.fits(acc.zero(), job_curve(shape, budget), caps(weights(budget, acc.zero()), budget)):
        return 1.0
    for _ in range(9):
        mid = (low + high) / 2
        curve = job_curve(shape, round(budget * mid, 6))
        if acc.fits(acc.zero(), curve, caps(weights(budget, curve), budget)):
            low = mid
        else:
            high = mid
    return low


def needed_total(weights: Weights, shape: str, count: int, target: float) -> float:
    """Least ε_total (0.01 steps) admitting ``count`` jobs of ``target`` one after another."""
    curve = job_curve(shape, target)

    def all_admitted(total: float) -> bool:
        budget_caps, used = caps(weights(total, curve), total), acc.zero()
        for _ in range(count):
            if not acc.fits(used, curve, budget_caps):
                return False
            used = acc.add(used, curve)
        return True

    total = target
    while not all_admitted(total):
        total = round(total + 0.01, 2)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows, results = [], []
    for shape in SHAPES:
        for name, weights in CANDIDATES.items():
            single = [largest_single(weights, shape, budget) for budget in BUDGETS]
            four, ten = needed_total(weights, shape, 4, 3.0), needed_total(weights, shape, 10, 1.0)
            results.append(
                {
                    "shape": shape,
                    "filter": name,
                    "single": dict(zip(BUDGETS, single, strict=True)),
                    "four_times_3": four,
                    "ten_times_1": ten,
                }
            )
            rows.append(
                [shape, name, *(f"{value:.3f}" for value in single), f"{four:.2f}", f"{ten:.2f}"]
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print_table(
        "Largest single job (fraction of a fresh budget) and ε_total needed for compositions",
        ["shape", "filter", "single@1", "single@3", "single@8", "ε_total 4×3", "ε_total 10×1"],
        rows,
    )
    save("budget_filter", {"delta": DELTA, "results": results}, args.json)


if __name__ == "__main__":
    main()
