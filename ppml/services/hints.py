"""``max_target_epsilon``: the largest target ε a job of a given shape can still get.

:meth:`ppml.privacy.ledger.Ledger.largest_fitting` searches σ with the job's metric releases
held at the noise calibrated for the job's own target: fast, and nearly right. But a job
submitted with that target calibrates its own training and metric noise, whose curve has a
slightly different shape, and under a filter whose δ shares differ by order
(``anchored-v1``) it may then miss the budget by a hair. So the hint is checked here by
pricing the job at it, exactly as admission would, and lowered until it fits. The search is
bounded (at most ``_LOWERINGS + _BISECTIONS + 1`` repricings, one in the common case) and
cached per dataset, budget version and job shape.
"""

from __future__ import annotations

from ppml.cache import LRUCache
from ppml.config import Settings
from ppml.db.models import Dataset, DatasetBudget
from ppml.errors import PPMLError
from ppml.privacy import accounting as acc
from ppml.privacy.ledger import Ledger, budget_filter, used_curve
from ppml.services.pricing import Pricing, price
from ppml.specs import JobSpec, request_hash

__all__ = ["largest_target"]

#: Lowerings of the hint by 1%, 2%, 4%, ... before giving up, then bisections of the gap.
_LOWERINGS = 6
_BISECTIONS = 4

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
    if pricing.event is None or spec.privacy is None:
        return None
    key = (budget.dataset_id, budget.version, request_hash(_at(spec, 1.0)))
    found = _CACHE.get(key)
    if found is None:
        found = (_search(spec, dataset, budget, pricing.event, settings),)
        _CACHE.put(key, found)
    return found[0]


def _search(
    spec: JobSpec,
    dataset: Dataset,
    budget: DatasetBudget,
    event: acc.MechanismEvent,
    settings: Settings,
) -> float | None:
    hint = Ledger.largest_fitting(budget, event)
    if hint is None:
        return None
    if _fits(spec, hint, dataset, budget, settings):
        return hint
    high, low, step = hint, None, 0.01
    for _ in range(_LOWERINGS):
        candidate = hint * (1 - step)
        if _fits(spec, candidate, dataset, budget, settings):
            low = candidate
            break
        high, step = candidate, step * 2
    if low is None:
        return None
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        if _fits(spec, mid, dataset, budget, settings):
            low = mid
        else:
            high = mid
    return low
