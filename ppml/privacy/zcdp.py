"""Mechanisms stated in zero-concentrated DP (rho-zCDP, add/remove neighbours) on the ledger.

A rho-zCDP mechanism is (α, α·rho)-RDP at every order α (Bun and Steinke 2016), so it enters
the ledger as the curve :func:`ppml.privacy.accounting.zcdp_curve` and composes with DP-SGD
jobs by the same order-by-order addition. Here: the largest rho a target ε allows, and the
largest ε a budget still admits (the hint of a 409).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from ppml.privacy.accounting import epsilon, fits, zcdp_curve

__all__ = ["calibrate_zcdp", "largest_fitting_zcdp"]


@lru_cache(maxsize=1024)
def calibrate_zcdp(*, target_epsilon: float, delta: float) -> float:
    """Largest rho (to 1e-9 relative) whose stored curve converts to at most ``target_epsilon``
    at ``delta``: what a zCDP mechanism may spend for a target ε on the ledger's grid.

    Raises:
        ValueError: when no rho reaches the target.
    """
    if not epsilon(zcdp_curve(1e-12), delta) <= target_epsilon:
        raise ValueError("no zCDP budget reaches this target")
    low, high = 1e-12, 1.0
    while epsilon(zcdp_curve(high), delta) <= target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            return low
    for _ in range(80):
        mid = (low + high) / 2
        if epsilon(zcdp_curve(mid), delta) <= target_epsilon:
            low = mid
        else:
            high = mid
        if high - low <= 1e-9 * low:
            break
    return low


def largest_fitting_zcdp(
    *, used: Sequence[int], budget_caps: Sequence[int], delta: float
) -> float | None:
    """Largest ε of a zCDP mechanism (curve α·rho) that the filter would still admit, or None
    (60 bisections of rho: a hint, priced outside any lock)."""
    if not fits(used, zcdp_curve(1e-9), budget_caps):
        return None
    low, high = 1e-9, 1e3
    if fits(used, zcdp_curve(high), budget_caps):
        return epsilon(zcdp_curve(high), delta)
    for _ in range(60):
        mid = math.sqrt(low * high)
        if fits(used, zcdp_curve(mid), budget_caps):
            low = mid
        else:
            high = mid
    return epsilon(zcdp_curve(low), delta)
