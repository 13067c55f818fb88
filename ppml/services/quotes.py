"""Quotes: what a job would cost and whether it fits its budget now, cheaply.

A quote reserves nothing. Quotes are cached per tenant, job shape (the spec without its name)
and the version of the dataset's budget row, which every ledger write bumps: a repeated quote
costs one read of that version. The search for the largest affordable ε is bounded and
cached per budget version (``ppml.services.hints``); every quote on a budget carries it."""

from __future__ import annotations

from dataclasses import dataclass

from ppml.cache import LRUCache
from ppml.config import Settings
from ppml.db.models import Dataset
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.privacy import accounting as acc
from ppml.privacy.budgets import budget_status
from ppml.privacy.ledger import Ledger
from ppml.services.hints import largest_target
from ppml.services.pricing import Pricing, price
from ppml.specs import JobSpec, ModelSpec, TrainingSpec, request_hash

__all__ = ["Quote", "Quotes"]


@dataclass(frozen=True, kw_only=True)
class Quote:
    epsilon: float
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int
    fits_budget: bool
    epsilon_remaining: float | None
    max_target_epsilon: float | None
    compute: int
    # The model and training priced: the spec's, or those ppml chose (defaults_applied).
    model: ModelSpec
    training: TrainingSpec
    defaults_applied: list[str]


def _shape(spec: JobSpec) -> str:
    """What a quote depends on in a spec: all of it but its name."""
    return request_hash(spec.model_copy(update={"name": ""}))


class Quotes:
    """The quotes of one job service, with their cache."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        # (tenant, job shape) → (budget version it was priced on, or None: no budget; quote)
        self._cache: LRUCache[tuple[str, str], tuple[int | None, Quote]] = LRUCache(10_000)

    def quote(self, tenant_id: str, dataset: Dataset, spec: JobSpec) -> Quote:
        """Price a job and say whether it fits its dataset's budget now; reserves nothing.

        A repeated quote of the same shape reads only the budget row's version, and is
        answered from the cache while that version is unchanged (on public data, or for a
        non-private job, there is no budget: the cached quote stands).
        """
        key = (tenant_id, _shape(spec))
        cached = self._cache.get(key)
        if cached is not None:
            version, quote = cached
            if version is None:
                return quote
            with self.db.read_one() as session:
                if Repositories(session).budget_version(dataset.id) == version:
                    return quote
        version, quote = self._fresh(spec, dataset, price(spec, dataset, self.settings))
        self._cache.put(key, (version, quote))
        return quote

    def _fresh(self, spec: JobSpec, dataset: Dataset, pricing: Pricing) -> tuple[int | None, Quote]:
        """The quote of a priced job on the budget as it is now, and that budget's version
        (None when nothing is charged to a budget)."""
        fits, remaining, largest, version = True, None, None, None
        if pricing.event is not None and dataset.epsilon_total is not None:
            with self.db.read_one() as session:
                ledger = Ledger(Repositories(session))
                budget = ledger.repos.budget(dataset.id)
                assert budget is not None
                version = budget.version
                fits = ledger.admits(budget, acc.rdp_curve(pricing.event))
                remaining = budget_status(budget).epsilon_remaining
            # The bounded, cached search, outside any session: in every quote, fitting or not.
            largest = largest_target(spec, dataset, budget, pricing, self.settings)
        event = pricing.event
        return version, Quote(
            epsilon=pricing.epsilon,
            delta=pricing.delta,
            noise_multiplier=event.noise_multiplier if event else None,
            sample_rate=event.sample_rate if event else None,
            steps=pricing.schedule.total_steps,
            fits_budget=fits,
            epsilon_remaining=remaining,
            max_target_epsilon=largest,
            compute=pricing.compute,
            model=spec.model,
            training=spec.training,
            defaults_applied=list(spec.defaults_applied),
        )
