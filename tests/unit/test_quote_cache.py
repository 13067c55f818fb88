"""Issue #15, finding 4: quotes are cached per tenant, job shape and budget version, so a
repeated quote is one read of the version; any ledger write makes the next quote fresh."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ppml.config import Settings
from ppml.db.session import Database
from ppml.errors import NotFound
from ppml.services import jobs as job_service
from ppml.services import quotes as quote_service
from ppml.services.jobs import JobService
from tests.unit.worlds import ServiceWorld as World
from tests.unit.worlds import job_spec as spec
from tests.unit.worlds import make_service_world as make_world


@pytest.fixture
def world(database: Database, settings: Settings) -> Iterator[World]:
    world = make_world(database, settings)
    yield world
    world.sent()  # leave nothing in the process-wide memory broker


@pytest.fixture
def pricings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the specs the job service prices (quotes and submits), in order."""
    priced: list[str] = []
    real = job_service.price

    def counting(job: Any, dataset: Any, settings: Any) -> Any:
        priced.append(job.name)
        return real(job, dataset, settings)

    monkeypatch.setattr(job_service, "price", counting)
    monkeypatch.setattr(quote_service, "price", counting)
    return priced


def fresh_quote(world: World, job: Any) -> Any:
    """What a service with nothing cached answers."""
    return JobService(world.db, world.settings, world.service.celery).quote(world.tenant_id, job)


def test_a_repeated_quote_is_answered_from_the_cache_with_the_same_figures(
    world: World, pricings: list[str]
) -> None:
    # arrange
    dataset = world.digits(epsilon=8.0)
    job = spec(dataset.id, epsilon=1.0)
    # act
    first = world.service.quote(world.tenant_id, job)
    second = world.service.quote(world.tenant_id, job)
    renamed = world.service.quote(world.tenant_id, job.model_copy(update={"name": "other"}))
    # assert: priced once; the name is not part of the shape
    assert pricings == ["tiny"]
    assert first == second == renamed == fresh_quote(world, job)


def test_a_quote_of_another_shape_is_priced_on_its_own(world: World, pricings: list[str]) -> None:
    # arrange
    dataset = world.digits(epsilon=8.0)
    # act
    short = world.service.quote(world.tenant_id, spec(dataset.id, epochs=2))
    long = world.service.quote(world.tenant_id, spec(dataset.id, epochs=4))
    # assert
    assert len(pricings) == 2
    assert long.steps == 2 * short.steps and long.compute == 2 * short.compute


def test_an_admission_changes_the_budget_and_the_next_quote_reflects_it(
    world: World, pricings: list[str]
) -> None:
    # arrange: a quote cached on the empty budget
    dataset = world.digits(epsilon=3.0)
    job = spec(dataset.id, epsilon=2.5)
    before = world.service.quote(world.tenant_id, job)
    assert before.fits_budget is True
    # act: a job admitted (a RESERVE bumps the budget's version), then the same quote
    world.service.submit(world.tenant_id, job)
    after = world.service.quote(world.tenant_id, job)
    # assert: priced again, on the budget as it is now
    assert len(pricings) == 3  # quote, submit, quote
    assert after.epsilon_remaining is not None and before.epsilon_remaining is not None
    assert after.epsilon_remaining < before.epsilon_remaining
    assert after.fits_budget is False and after.max_target_epsilon is not None
    assert after == fresh_quote(world, job)


def test_a_cancellation_also_makes_the_next_quote_fresh(world: World) -> None:
    # arrange
    dataset = world.digits(epsilon=3.0)
    job = spec(dataset.id, epsilon=2.5)
    admitted, _ = world.service.submit(world.tenant_id, job)
    full = world.service.quote(world.tenant_id, job)
    # act: the release bumps the version again
    world.service.cancel(world.tenant_id, admitted.id)
    again = world.service.quote(world.tenant_id, job)
    # assert
    assert full.fits_budget is False and again.fits_budget is True
    assert again == fresh_quote(world, job)


def test_a_quote_on_public_data_stays_cached(world: World, pricings: list[str]) -> None:
    # arrange
    dataset = world.digits(epsilon=None)
    job = spec(dataset.id, epsilon=None)
    # act
    quotes = [world.service.quote(world.tenant_id, job) for _ in range(3)]
    # assert
    assert pricings == ["tiny"] and quotes[0] == quotes[2]
    assert quotes[0].epsilon == 0 and quotes[0].compute > 0


def test_another_tenant_does_not_get_a_cached_quote_of_a_dataset_it_does_not_own(
    world: World,
) -> None:
    # arrange
    dataset = world.digits(epsilon=8.0)
    job = spec(dataset.id)
    world.service.quote(world.tenant_id, job)
    stranger = make_world(world.db, world.settings)
    # act / assert: the same service, another tenant
    with pytest.raises(NotFound):
        world.service.quote(stranger.tenant_id, job)
