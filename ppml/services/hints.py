"""``max_target_epsilon``: the largest target ε a job of a given shape can still get.

A first search over σ (:func:`ppml.privacy.calibration.largest_fitting_epsilon`, at most 35
curves, about 0.15 s) holds the job's metric releases at the noise calibrated for the job's
own target: fast, and nearly right. But a job
submitted with that target calibrates its own training and metric noise, whose curve has a
slightly different shape, and under a filter whose δ shares differ by order
(``anchored-v1``) it may then miss the budget by a hair. So the hint is checked here by
pricing the job at it, exactly as admission would, and lowered until it fits. When little
budget is left, the metric releases priced at the job's own target may alone exceed it, and
the σ search finds nothing although a smaller job (with less noisy metrics to pay for) would
fit: the search then starts from the whole budget. The search is bounded (at most 13
repricings, one in the common case, each about 0.05 s) and cached per dataset, budget
version and job shape.
"""

from __future__ import annotations

from ppml.cache import LRUCache
from ppml.config import Settings
from ppml.db.models import Dataset, DatasetBudget
from ppml.errors import PPMLError
from ppml.privacy import accounting as acc
from ppml.privacy import calibration as cal
from ppml.privacy.budgets import budget_filter, used_curve
from ppml.privacy.zcdp import largest_fitting_zcdp
from ppml.services.pricing import Pricing, price
from ppml.specs import JobSpec, request_hash

__all__ = ["largest_target"]

#: Fractions of the hint tried, in turn, when the hint itself does not fit; then bisections
#: between the first that fits and the one before it.
_LOWERINGS = (0.98, 0.9, 0.7, 0.5, 0.25, 0.1, 0.03)
_BISECTIONS = 5

_CACHE: LRUCache[tuple[str, int, str], tuple[float | None]] = LRUCache(4096)


def _at(spec: JobSpec, target: float) -> JobSpec:
    assert spec.privacy is not None
    privacy = spec.privacy.model_copy(update={"target_epsilon": target})
    return spec.model_copy(update={"privacy": privacy, "name": ""})


def _fits(
    spec: JobSpec, target: float, dataset: Dataset, budget: DatasetBudget, settings: Settings
) -> bool:
    """Whether admission would admit this job at ``target`` on ``budget`` as it is."""
    if target < 1e-3:  # the smallest target a spec may name
        return False
    try:
        event = price(_at(spec, target), dataset, settings).event
    except PPMLError:  # no σ reaches that target: it is not on offer
        return False
    return event is not None and budget_filter(budget).fits(
        used_curve(budget), acc.rdp_curve(event)
    )


def largest_target(
    spec: JobSpec, dataset: Dataset, budget: DatasetBudget, pricing: Pricing, settings: Settings
) -> float | None:
    """The largest target ε of ``spec``'s shape that admission would admit now, or None.

    Call it outside any lock: it prices the job again (see the module docstring).
    """
    event = pricing.event
    if event is None or spec.privacy is None:
        return None
    if not (event.steps or event.zcdp_rho or event.eval_releases):
        return None  # a job that costs nothing (pate: its answers are charged apart)
    key = (budget.dataset_id, budget.version, request_hash(_at(spec, 1.0)))
    found = _CACHE.get(key)
    if found is None:
        found = (_search(spec, dataset, budget, event, settings),)
        _CACHE.put(key, found)
    return found[0]


def _sigma_hint(budget: DatasetBudget, event: acc.MechanismEvent) -> float | None:
    """The σ search at this job's shape, its metric releases held fixed (or, for a zCDP
    mechanism such as MST, the largest rho that fits, as ε)."""
    used, budget_caps = used_curve(budget), budget_filter(budget).caps()
    if event.zcdp_rho:
        return largest_fitting_zcdp(used=used, budget_caps=budget_caps, delta=budget.delta_total)
    return cal.largest_fitting_epsilon(
        used=used,
        budget_caps=budget_caps,
        sample_rate=event.sample_rate,
        steps=event.steps,
        delta=budget.delta_total,
        unit=event.unit,
        evaluation=acc.evaluation_curve(event.eval_noise_multiplier, event.eval_releases)
        if event.eval_noise_multiplier is not None
        else None,
    )


def _search(
    spec: JobSpec,
    dataset: Dataset,
    budget: DatasetBudget,
    event: acc.MechanismEvent,
    settings: Settings,
) -> float | None:
    hint = _sigma_hint(budget, event)
    if hint is not None and _fits(spec, hint, dataset, budget, settings):
        return hint
    # The σ search missed (its metric releases may alone exceed a nearly spent budget):
    # search down from the hint, or from the whole budget when it found nothing.
    start = hint if hint is not None else budget.epsilon_total
    high, low = start, None
    for fraction in _LOWERINGS:
        if _fits(spec, start * fraction, dataset, budget, settings):
            low = start * fraction
            break
        high = start * fraction
    if low is None:
        return None
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        if _fits(spec, mid, dataset, budget, settings):
            low = mid
        else:
            high = mid
    return low
