"""The job service on its own: quote, admission (single and grouped), idempotent replays,
cancellation; on the real databases (SQLite and PostgreSQL) and a real Celery app on
kombu's in-process ``memory://`` broker."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import pytest

from ppml.config import Settings
from ppml.db.models import Job, JobStatus, LedgerKind
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import (
    BudgetExceeded,
    IdempotencyMismatch,
    JobNotCancellable,
    NotFound,
    TooManyRequests,
)
from ppml.jobs.runner import JobRunner
from ppml.privacy import accounting as acc
from ppml.privacy import filters
from ppml.privacy.budgets import budget_status
from ppml.services.grouping import Pending
from ppml.services.jobs import JobService
from ppml.services.pricing import price
from ppml.services.tenants import create_tenant
from tests.unit.worlds import ServiceWorld as World
from tests.unit.worlds import job_spec as spec
from tests.unit.worlds import make_service_world as make_world

ZERO = list(acc.zero())


@pytest.fixture
def world(database: Database, settings: Settings) -> Iterator[World]:
    world = make_world(database, settings)
    yield world
    world.sent()  # leave nothing in the process-wide memory broker


def snapshot(world: World, dataset_id: str) -> tuple[Any, ...]:
    """Everything admission may write: the budget row, the entries, the jobs."""
    budget = world.budget(dataset_id)
    entries = [(e.id, e.kind) for e in world.ledger(dataset_id)]
    return budget.committed, budget.reserved, budget.version, entries, world.job_count()


# ----------------------------------------------------------------------------- quote


def test_a_quote_prices_the_job_as_admission_would_and_writes_nothing(world: World) -> None:
    # arrange
    dataset = world.digits(epsilon=8.0)
    job = spec(dataset.id, epsilon=1.0)
    priced = price(job, dataset, world.settings)
    before = snapshot(world, dataset.id)
    # act
    quote = world.service.quote(world.tenant_id, job)
    # assert
    assert priced.event is not None
    assert quote.fits_budget is True and quote.max_target_epsilon is not None
    assert quote.max_target_epsilon >= quote.epsilon  # always offered, fitting or not
    assert quote.epsilon == priced.epsilon and 0.99 < quote.epsilon <= 1.0
    assert quote.noise_multiplier == priced.event.noise_multiplier
    assert quote.sample_rate == priced.event.sample_rate
    assert quote.steps == priced.schedule.total_steps == priced.event.steps
    assert quote.epsilon_remaining == budget_status(world.budget(dataset.id)).epsilon_remaining
    assert snapshot(world, dataset.id) == before
    assert before[:2] == ({"grid": acc.GRID_VERSION, "units": ZERO},) * 2
    assert world.sent() == []


def test_a_quote_of_a_job_over_budget_offers_the_largest_target_that_fits(world: World) -> None:
    # arrange
    dataset = world.digits(epsilon=1.0)
    before = snapshot(world, dataset.id)
    # act
    quote = world.service.quote(world.tenant_id, spec(dataset.id, epsilon=3.0))
    # assert
    assert quote.fits_budget is False
    assert quote.max_target_epsilon is not None and 0 < quote.max_target_epsilon < 1.0
    assert snapshot(world, dataset.id) == before


# ----------------------------------------------------------------------------- submit


@pytest.mark.parametrize("key", [None, "key-1"], ids=["grouped", "keyed"])
def test_submit_reserves_exactly_the_curve_it_priced_and_sends_the_job(
    world: World, key: str | None
) -> None:
    # arrange
    dataset = world.digits(epsilon=8.0)
    job_spec = spec(dataset.id, epsilon=1.0)
    priced = price(job_spec, dataset, world.settings)
    assert priced.event is not None
    curve = list(acc.rdp_curve(priced.event))
    # act
    job, created = world.service.submit(world.tenant_id, job_spec, idempotency_key=key)
    # assert: one RESERVE entry of the priced curve, the totals moved by exactly that
    assert created and job.status == JobStatus.QUEUED
    entries = world.ledger(dataset.id)
    assert [(e.kind, e.job_id) for e in entries] == [(LedgerKind.RESERVE, job.id)]
    reserve = entries[0]
    assert reserve.rdp == {"grid": acc.GRID_VERSION, "units": curve}
    assert reserve.event == priced.event.to_dict()
    assert reserve.idempotency_key == f"{job.id}:reserve"
    budget = world.budget(dataset.id)
    assert budget.reserved["units"] == curve and budget.committed["units"] == ZERO
    # the row carries the plan it was priced with, and its message went out after commit
    stored = world.job(job.id)
    assert stored.privacy == priced.privacy_plan(job_spec)
    assert stored.attempts == 0 and not stored.data_touched and stored.idempotency_key == key
    assert stored.enqueued_at is not None
    assert world.sent() == [job.id]


def test_a_job_on_public_data_reserves_nothing(world: World) -> None:
    # arrange
    dataset = world.digits(epsilon=None)
    # act
    job, created = world.service.submit(world.tenant_id, spec(dataset.id, epsilon=None))
    # assert
    assert created and job.privacy is None
    assert world.ledger(dataset.id) == []
    assert world.sent() == [job.id]


def test_an_idempotency_key_replay_returns_the_same_job_and_reserves_once(world: World) -> None:
    # arrange
    dataset = world.digits(epsilon=8.0)
    job_spec = spec(dataset.id)
    first, created = world.service.submit(world.tenant_id, job_spec, idempotency_key="k")
    after_first = snapshot(world, dataset.id)
    # act
    again, created_again = world.service.submit(world.tenant_id, job_spec, idempotency_key="k")
    # assert: the same job, nothing written or sent a second time
    assert (created, created_again) == (True, False)
    assert again.id == first.id
    assert snapshot(world, dataset.id) == after_first
    assert [e.kind for e in world.ledger(dataset.id)] == [LedgerKind.RESERVE]
    assert world.sent() == [first.id]


def test_an_idempotency_key_reused_with_another_body_is_refused_and_writes_nothing(
    world: World,
) -> None:
    # arrange
    dataset = world.digits(epsilon=8.0)
    world.service.submit(world.tenant_id, spec(dataset.id, epochs=2), idempotency_key="k")
    world.sent()
    before = snapshot(world, dataset.id)
    # act
    with pytest.raises(IdempotencyMismatch) as refused:
        world.service.submit(world.tenant_id, spec(dataset.id, epochs=3), idempotency_key="k")
    # assert
    assert refused.value.field == "Idempotency-Key"
    assert snapshot(world, dataset.id) == before
    assert world.sent() == []


def test_an_idempotency_key_is_scoped_to_its_tenant(world: World) -> None:
    # arrange: another tenant uses the same key on its own data
    with world.db.session(write=True) as session:
        other = create_tenant(Repositories(session), name=f"t-{secrets.token_hex(4)}").id
    mine, theirs = world.digits(), world.digits(tenant_id=other)
    first, _ = world.service.submit(world.tenant_id, spec(mine.id), idempotency_key="k")
    # act
    second, created = world.service.submit(other, spec(theirs.id), idempotency_key="k")
    # assert
    assert created and second.id != first.id and second.tenant_id == other


@pytest.mark.parametrize("key", [None, "key-1"], ids=["grouped", "keyed"])
def test_a_job_over_budget_is_refused_with_what_remains_and_writes_nothing(
    world: World, key: str | None
) -> None:
    # arrange
    dataset = world.digits(epsilon=1.0)
    before = snapshot(world, dataset.id)
    # act
    with pytest.raises(BudgetExceeded) as refused:
        world.service.submit(world.tenant_id, spec(dataset.id, epsilon=3.0), idempotency_key=key)
    # assert: the 409 says what is left and the largest target that would fit
    extra = refused.value.extra
    assert extra["epsilon_remaining"] == budget_status(world.budget(dataset.id)).epsilon_remaining
    assert 0 < extra["epsilon_remaining"] <= 1.0
    assert extra["epsilon_requested"] > extra["epsilon_remaining"]
    assert extra["max_target_epsilon"] is not None and 0 < extra["max_target_epsilon"] < 1.0
    assert snapshot(world, dataset.id) == before
    assert world.sent() == []


def test_the_largest_target_offered_in_a_refusal_is_admitted(world: World) -> None:
    # arrange: a budget partly reserved by one job; a second one too large for the rest
    dataset = world.digits(epsilon=2.0)
    world.service.submit(world.tenant_id, spec(dataset.id, epsilon=1.0))
    with pytest.raises(BudgetExceeded) as refused:
        world.service.submit(world.tenant_id, spec(dataset.id, epsilon=1.8))
    offered = refused.value.extra["max_target_epsilon"]
    # act
    job, created = world.service.submit(world.tenant_id, spec(dataset.id, epsilon=offered))
    # assert
    assert created and job.privacy is not None and job.privacy.target_epsilon == offered


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class GatedService(JobService):
    """Admission whose first batch waits until ``queued`` more admissions queue behind it,
    so that those are decided together, in one transaction, as the next batch."""

    def __init__(self, world: World, *, queued: int) -> None:
        super().__init__(world.db, world.settings, world.service.celery)
        self.queued = queued
        self.batches: list[int] = []

    def waiting(self, dataset_id: str) -> int:
        return len(self._admissions._waiting.get(dataset_id, ()))

    def _admit_batch(self, dataset_id: Hashable, batch: Sequence[Pending[Any, Job]]) -> None:
        self.batches.append(len(batch))
        if len(self.batches) == 1:
            wait_until(lambda: self.waiting(str(dataset_id)) == self.queued)
        super()._admit_batch(dataset_id, batch)


def test_admissions_decided_together_equal_a_serial_replay_in_arrival_order(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # arrange: one admission holds the dataset's batch open while five more queue, in order
    dataset = world.digits(epsilon=2.0)
    specs = [spec(dataset.id, epsilon=1.0) for _ in range(6)]
    caps, used, expected = filters.new_filter(2.0, 1e-5).caps(), acc.zero(), []
    for job_spec in specs:  # the filter, in arrival order (σ calibrated here, outside the race)
        event = price(job_spec, dataset, world.settings).event
        assert event is not None
        expected.append(acc.fits(used, acc.rdp_curve(event), caps))
        used = acc.add(used, acc.rdp_curve(event)) if expected[-1] else used
    assert True in expected[1:] and False in expected[1:]  # the batch admits and refuses
    service = GatedService(world, queued=len(specs) - 1)
    outcomes: dict[int, Job | BudgetExceeded] = {}

    def submit(index: int) -> None:
        try:
            outcomes[index] = service.submit(world.tenant_id, specs[index])[0]
        except BudgetExceeded as refusal:
            outcomes[index] = refusal

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(specs))]

    def queued(count: int) -> Callable[[], bool]:
        return lambda: service.waiting(dataset.id) == count

    # act
    threads[0].start()
    wait_until(lambda: service.batches == [1])  # the leader holds its batch open
    for index, thread in enumerate(threads[1:], start=1):
        thread.start()
        wait_until(queued(index))  # one at a time, so the arrival order is known
    for thread in threads:
        thread.join(timeout=60)
    # assert: the leader alone, then the five together, decided as one after the other
    assert service.batches == [1, len(specs) - 1]
    assert "grouped admission failed" not in caplog.text  # no one-by-one fallback
    assert [isinstance(outcomes[i], Job) for i in range(len(specs))] == expected
    admitted = [o.id for o in outcomes.values() if isinstance(o, Job)]
    entries = world.ledger(dataset.id)
    assert sorted(e.job_id for e in entries) == sorted(admitted)
    assert {e.kind for e in entries} == {LedgerKind.RESERVE}
    assert tuple(world.budget(dataset.id).reserved["units"]) == used
    assert world.job_count() == len(admitted)
    for refusal in (o for o in outcomes.values() if isinstance(o, BudgetExceeded)):
        assert refusal.extra["max_target_epsilon"] is not None
    assert sorted(world.sent()) == sorted(admitted)


def test_a_tenant_at_its_active_job_limit_is_refused_but_may_still_replay(
    database: Database, settings: Settings
) -> None:
    # arrange: one queued or running job per tenant
    world = make_world(database, settings, max_active_jobs_per_tenant=1)
    dataset = world.digits(epsilon=8.0)
    first, _ = world.service.submit(world.tenant_id, spec(dataset.id), idempotency_key="k")
    before = snapshot(world, dataset.id)
    # act
    with pytest.raises(TooManyRequests) as refused:
        world.service.submit(world.tenant_id, spec(dataset.id, epochs=3))
    replay, created = world.service.submit(world.tenant_id, spec(dataset.id), idempotency_key="k")
    # assert
    assert refused.value.extra["limit"] == 1
    assert replay.id == first.id and not created
    assert snapshot(world, dataset.id) == before
    world.sent()


# ----------------------------------------------------------------------------- cancel


def test_cancel_of_a_queued_job_releases_everything_and_a_second_cancel_is_refused(
    world: World,
) -> None:
    # arrange
    dataset = world.digits(epsilon=8.0)
    job, _ = world.service.submit(world.tenant_id, spec(dataset.id))
    # act
    cancelled = world.service.cancel(world.tenant_id, job.id)
    # assert: never touched, so the whole reservation goes back and nothing is committed
    assert cancelled.status == JobStatus.CANCELLED and cancelled.cancel_requested
    entries = {e.kind: e for e in world.ledger(dataset.id)}
    assert sorted(entries) == ["release", "reserve"]
    assert entries[LedgerKind.RELEASE].rdp == entries[LedgerKind.RESERVE].rdp
    budget = world.budget(dataset.id)
    assert budget.reserved["units"] == ZERO and budget.committed["units"] == ZERO
    stored = world.job(job.id)
    assert stored.status == JobStatus.CANCELLED and stored.finished_at is not None
    assert stored.privacy is not None and stored.privacy.epsilon_spent == 0.0
    assert stored.privacy.ledger_entry_id is None and stored.privacy.steps == 0
    # a second cancel is refused and changes nothing
    settled = snapshot(world, dataset.id)
    with pytest.raises(JobNotCancellable) as refused:
        world.service.cancel(world.tenant_id, job.id)
    assert refused.value.extra["job_status"] == JobStatus.CANCELLED
    assert snapshot(world, dataset.id) == settled


def test_a_jobs_entries_read_back_in_chain_order_whatever_their_ids(world: World) -> None:
    # arrange: a settled job whose reservation's id sorts after its release's (ids made in
    # one millisecond sort at random; a receipt lists the entries in this order)
    dataset = world.digits(epsilon=8.0)
    job, _ = world.service.submit(world.tenant_id, spec(dataset.id))
    world.service.cancel(world.tenant_id, job.id)
    with world.db.session(write=True) as session:
        reserve = Repositories(session).ledger_entry(f"{job.id}:{LedgerKind.RESERVE}")
        assert reserve is not None
        reserve.id = "led_zzzzzzzzzzzz" + reserve.id[16:]
    # act
    entries = world.job_ledger(job.id)
    # assert
    assert [e.kind for e in entries] == [LedgerKind.RESERVE, LedgerKind.RELEASE]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)


def test_cancel_of_a_running_job_only_asks_its_worker_to_stop(world: World) -> None:
    # arrange
    dataset = world.digits(epsilon=8.0)
    job, _ = world.service.submit(world.tenant_id, spec(dataset.id))
    assert JobRunner(world.db, world.settings, owner="worker-a").claim(job.id) is not None
    # act
    asked = world.service.cancel(world.tenant_id, job.id)
    # assert: still running under its lease, reservation whole; the worker settles it
    assert asked.status == JobStatus.RUNNING and asked.cancel_requested
    stored = world.job(job.id)
    assert stored.lease_owner == "worker-a" and stored.cancel_requested
    assert [e.kind for e in world.ledger(dataset.id)] == [LedgerKind.RESERVE]


def test_cancel_of_another_tenants_job_is_not_found_and_changes_nothing(world: World) -> None:
    # arrange
    dataset = world.digits(epsilon=8.0)
    job, _ = world.service.submit(world.tenant_id, spec(dataset.id))
    with world.db.session(write=True) as session:
        stranger = create_tenant(Repositories(session), name=f"t-{secrets.token_hex(4)}").id
    # act
    with pytest.raises(NotFound):
        world.service.cancel(stranger, job.id)
    # assert
    stored = world.job(job.id)
    assert stored.status == JobStatus.QUEUED and not stored.cancel_requested
