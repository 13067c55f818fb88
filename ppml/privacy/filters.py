"""The admission filters of dataset budgets: which δ each RDP order gets, and its caps.

A budget (ε_total, δ_total) admits a job iff, at some order α of the grid,
``used(α) + job(α) ≤ cap(α)`` with

    cap(α) = ε_total − log(1 − 1/α) + (log(w_α · δ_total) + log α)/(α − 1)

(the Balle et al. 2020 conversion at δ_α = w_α · δ_total). The weights w_α sum to at most 1
and are fixed before the budget's first release, so the filter is (ε_total, δ_total)-DP under
adaptive composition (docs/privacy.md, "The admission filter", has the proof). Two versions:

* ``uniform-v1``: w_α = 1/|A| at every order (the filter before this module; budgets that
  were charged under it keep it).
* ``anchored-v1``: most of δ at the budget's **anchor order** and the grid order just below
  it, the rest spread over the other orders. The anchor is the order at which a Gaussian-shaped
  curve (α·c) that exactly exhausts the budget converts best: a function of (ε_total,
  δ_total) alone, fixed when the budget is opened. Any sequence of jobs that nearly exhausts
  a budget composes to a curve whose best order is close to that anchor, so little ε is lost
  to the split (``bench/budget_filter.py`` measures it).

A version's weights must never change: budgets store their version (and anchor), and caps
are recomputed from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from ppml.privacy import accounting as acc

__all__ = [
    "ANCHORED",
    "DEFAULT",
    "FILTERS",
    "UNIFORM",
    "BudgetFilter",
    "anchor_order",
    "anchored_weights",
    "new_filter",
]

UNIFORM = "uniform-v1"
ANCHORED = "anchored-v1"
FILTERS = (UNIFORM, ANCHORED)
#: The filter of budgets opened from now on.
DEFAULT = ANCHORED

#: anchored-v1: shares of δ_total at the anchor and at the order just below it (where the
#: curves of DP-SGD jobs with small σ convert best); the rest (1/10) is split evenly over
#: every other order. At the grid's lowest order the anchor takes both shares.
ANCHOR_SHARE = Fraction(2, 5)
BELOW_SHARE = Fraction(1, 2)


def offset(order: float, delta: float) -> float:
    """ε − cap(α) of the Balle et al. conversion at order α and δ: ``log(1 − 1/α) −
    (log δ + log α)/(α − 1)``."""
    return math.log1p(-1 / order) - (math.log(delta) + math.log(order)) / (order - 1)


def anchor_order(epsilon_total: float, delta_total: float) -> float:
    """The grid order at which the Gaussian-shaped curve α·c that exhausts the budget (at the
    full δ) converts to its least ε. A function of the budget alone.

    c is found by 200 bisections (the conversion is increasing in c), so the result is a
    deterministic function of two floats.
    """

    def converted(c: float) -> float:
        return min(order * c + offset(order, delta_total) for order in acc.ORDERS)

    low, high = 0.0, max(1.0, epsilon_total)
    for _ in range(200):
        mid = (low + high) / 2
        if converted(mid) <= epsilon_total:
            low = mid
        else:
            high = mid
    return min(acc.ORDERS, key=lambda order: order * low + offset(order, delta_total))


def anchored_weights(anchor: float) -> tuple[Fraction, ...]:
    """anchored-v1's share of δ at each order of the grid (they sum to exactly 1)."""
    index = acc.ORDERS.index(anchor)
    if index == 0:
        shares = {0: ANCHOR_SHARE + BELOW_SHARE}
    else:
        shares = {index: ANCHOR_SHARE, index - 1: BELOW_SHARE}
    rest = (1 - sum(shares.values(), Fraction(0))) / (len(acc.ORDERS) - len(shares))
    return tuple(shares.get(i, rest) for i in range(len(acc.ORDERS)))


@lru_cache(maxsize=1024)
def _weights(version: str, anchor: float | None) -> tuple[Fraction, ...]:
    if version == UNIFORM:
        return (Fraction(1, len(acc.ORDERS)),) * len(acc.ORDERS)
    if version == ANCHORED and anchor is not None:
        return anchored_weights(anchor)
    raise ValueError(f"unknown admission filter {version!r} (anchor {anchor!r})")


@lru_cache(maxsize=4096)
def _caps(version: str, anchor: float | None, epsilon_total: float, delta: float) -> acc.Curve:
    if version == UNIFORM:  # exactly the caps budgets were admitted under before
        return acc.caps(epsilon_total, delta)
    return tuple(
        math.floor(
            Fraction(epsilon_total - offset(order, float(weight) * delta)) * acc.UNITS_PER_NAT
        )
        for order, weight in zip(acc.ORDERS, _weights(version, anchor), strict=True)
    )


@dataclass(frozen=True, kw_only=True)
class BudgetFilter:
    """The admission filter of one budget: its version, anchor and totals."""

    version: str
    anchor: float | None
    epsilon_total: float
    delta_total: float

    def weights(self) -> tuple[Fraction, ...]:
        """Share of δ_total at each order (exact; they sum to at most 1)."""
        return _weights(self.version, self.anchor)

    def caps(self) -> acc.Curve:
        """Per-order caps in integer units, rounded down."""
        return _caps(self.version, self.anchor, self.epsilon_total, self.delta_total)

    def fits(self, used: Sequence[int], job: Sequence[int]) -> bool:
        """Admission: some order keeps ``used + job`` at or under its cap (exact integers)."""
        return acc.fits(used, job, self.caps())

    def epsilon(self, curve: Sequence[int]) -> float:
        """ε of ``curve`` as this filter counts it: the least ε_total whose caps (with these
        weights) would still hold it; 0 for the empty curve."""
        if all(value == 0 for value in curve):
            return 0.0
        best = min(
            value / acc.UNITS_PER_NAT + offset(order, float(weight) * self.delta_total)
            for order, value, weight in zip(acc.ORDERS, curve, self.weights(), strict=True)
            if weight > 0
        )
        return max(0.0, best)


def new_filter(epsilon_total: float, delta_total: float) -> BudgetFilter:
    """The filter of a budget opened now (``DEFAULT``, anchored at the budget's order)."""
    return BudgetFilter(
        version=DEFAULT,
        anchor=anchor_order(epsilon_total, delta_total),
        epsilon_total=epsilon_total,
        delta_total=delta_total,
    )
