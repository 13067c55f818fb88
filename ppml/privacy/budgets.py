"""A dataset's budget row read as users and admission see it: its admission filter, the
curve it has used, and spent, reserved and remaining ε in the filter's unit. The row itself
changes only through :class:`ppml.privacy.ledger.Ledger`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ppml.db.models import DatasetBudget
from ppml.privacy import accounting as acc
from ppml.privacy import filters

__all__ = ["BudgetStatus", "budget_filter", "budget_status", "curve_of", "units_of", "used_curve"]


@dataclass(frozen=True, kw_only=True)
class BudgetStatus:
    """A dataset's budget as users see it: ε at the dataset's δ as its admission filter counts
    it, so ``spent + reserved + remaining == total`` (up to float rounding)."""

    epsilon_total: float
    delta_total: float
    epsilon_spent: float
    epsilon_reserved: float
    epsilon_remaining: float
    unit: str
    admission_filter: str
    filter_anchor: float | None
    epsilon_spent_composed: float  # the committed curve's tight conversion, at the full δ


def units_of(curve: Sequence[int]) -> dict[str, object]:
    """A curve as a budget row or ledger entry stores it (JSON: its grid and units)."""
    return {"grid": acc.GRID_VERSION, "units": list(curve)}


def curve_of(data: dict[str, object]) -> acc.Curve:
    """The curve a budget row or ledger entry stores (see :func:`units_of`)."""
    units = data["units"]
    assert isinstance(units, list)
    return tuple(int(value) for value in units)


def budget_filter(budget: DatasetBudget) -> filters.BudgetFilter:
    """The admission filter a budget row was opened with (ppml.privacy.filters)."""
    return filters.BudgetFilter(
        version=budget.admission_filter,
        anchor=budget.filter_anchor,
        epsilon_total=budget.epsilon_total,
        delta_total=budget.delta_total,
    )


def used_curve(budget: DatasetBudget) -> acc.Curve:
    """Committed plus reserved: the curve admission compares with the caps."""
    return acc.add(curve_of(budget.committed), curve_of(budget.reserved))


def budget_status(budget: DatasetBudget) -> BudgetStatus:
    """Spent, reserved and remaining ε of a budget row, in one unit: the filter's ε.

    Spent is what the filter counts for the committed curve, reserved what the reservations
    add to it, remaining what the filter still allows; the three add up to the total.
    (The filter's ε of a curve is at least its tight (ε, δ) conversion: it converts at the
    share of δ its filter gives each order.)
    """
    check = budget_filter(budget)
    committed, reserved = curve_of(budget.committed), curve_of(budget.reserved)
    spent = min(check.epsilon(committed), budget.epsilon_total)
    held = min(max(check.epsilon(acc.add(committed, reserved)), spent), budget.epsilon_total)
    return BudgetStatus(
        epsilon_total=budget.epsilon_total,
        delta_total=budget.delta_total,
        epsilon_spent=spent,
        epsilon_reserved=held - spent,
        epsilon_remaining=budget.epsilon_total - held,
        unit=budget.unit,
        admission_filter=budget.admission_filter,
        filter_anchor=budget.filter_anchor,
        epsilon_spent_composed=acc.epsilon(committed, budget.delta_total),
    )
