"""The per-tenant compute limit at admission: the compute of the tenant's queued and running
jobs is summed under its row lock, and a batch decided together counts the jobs it admitted
before each decision (on SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ppml.config import Settings
from ppml.db.models import Job, JobStatus
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import TooManyRequests
from ppml.services.admissions import Admission
from ppml.services.jobs import JobService
from ppml.services.pricing import price
from ppml.services.rooms import CountedRooms, Room
from ppml.specs import request_hash
from tests.unit.worlds import ServiceWorld as World
from tests.unit.worlds import job_spec as spec
from tests.unit.worlds import make_service_world as make_world


@pytest.fixture
def world(database: Database, settings: Settings) -> Iterator[World]:
    world = make_world(database, settings)
    yield world
    world.sent()  # leave nothing in the process-wide memory broker


def limited(world: World, max_tenant_compute: int) -> JobService:
    """A job service like the world's, with its own tenant compute limit."""
    limits = world.settings.limits.model_copy(update={"max_tenant_compute": max_tenant_compute})
    settings = world.settings.model_copy(update={"limits": limits})
    return JobService(world.db, settings, world.service.celery)


def test_a_batch_counts_the_compute_admitted_before_each_decision(world: World) -> None:
    # arrange: one job already queued; room for two more of its size
    dataset = world.digits(epsilon=100.0)
    job_spec = spec(dataset.id, epsilon=0.5)
    size = price(job_spec, dataset, world.settings).compute
    service = limited(world, 3 * size)
    service.submit(world.tenant_id, job_spec)
    pricing = price(job_spec, dataset, service.settings)
    admission = Admission(
        tenant_id=world.tenant_id, dataset=dataset, spec=job_spec, pricing=pricing
    )
    # act: five admissions decided together in one transaction
    decided = service._decide(dataset.id, [(admission, request_hash(job_spec))] * 5)[0]
    # assert: two admitted, three refused with the figures of the moment
    assert [isinstance(d, Job) for d in decided] == [True, True, False, False, False]
    for refusal in decided[2:]:
        assert isinstance(refusal, TooManyRequests)
        assert refusal.extra["compute_in_use"] == 3 * size
        assert refusal.extra["compute_requested"] == size
        assert refusal.extra["limit"] == 3 * size
        assert refusal.extra["retry_after"] == 30
    with world.db.session() as session:
        assert Repositories(session).active_load(world.tenant_id)[1] == 3 * size


def test_jobs_without_an_estimate_and_finished_jobs_count_nothing(world: World) -> None:
    # arrange: a job admitted before estimates existed, and one cancelled
    dataset = world.digits(epsilon=100.0)
    old, _ = world.service.submit(world.tenant_id, spec(dataset.id, epsilon=0.5))
    cancelled, _ = world.service.submit(world.tenant_id, spec(dataset.id, epsilon=0.5))
    world.service.cancel(world.tenant_id, cancelled.id)
    with world.db.session(write=True) as session:
        row = Repositories(session).job_by_id(old.id)
        assert row is not None
        row.compute = None
    # act
    with world.db.session() as session:
        in_use = Repositories(session).active_load(world.tenant_id)[1]
        status = Repositories(session).job_by_id(cancelled.id)
    # assert
    assert in_use == 0
    assert status is not None and status.status == JobStatus.CANCELLED
    assert status.compute is not None and status.compute > 0


def test_the_limit_is_per_tenant(world: World) -> None:
    # arrange: a tenant at its limit. Each registration of digits draws its own keyed split,
    # so the two tenants' jobs differ slightly in size: the limit fits the larger one alone.
    dataset = world.digits(epsilon=100.0)
    job_spec = spec(dataset.id, epsilon=0.5)
    other = make_world(world.db, world.settings)
    other_dataset = other.digits(epsilon=100.0)
    size = price(job_spec, dataset, world.settings).compute
    other_size = price(spec(other_dataset.id, epsilon=0.5), other_dataset, world.settings).compute
    assert 2 * size > max(size, other_size)
    service = limited(world, max(size, other_size))
    service.submit(world.tenant_id, job_spec)
    # act
    with pytest.raises(TooManyRequests):
        service.submit(world.tenant_id, job_spec)
    neighbour, created = service.submit(other.tenant_id, spec(other_dataset.id, epsilon=0.5))
    # assert
    assert created and neighbour.status == JobStatus.QUEUED
    other.sent()


def test_a_bound_that_cannot_prove_room_counts_again(world: World) -> None:
    # arrange: room for three jobs; the first admission counts, the second is decided on the
    # bound (the last count plus the tenant's admission counters)
    dataset = world.digits(epsilon=100.0)
    job_spec = spec(dataset.id, epsilon=0.5)
    size = price(job_spec, dataset, world.settings).compute
    service = limited(world, 3 * size)
    for _ in range(3):
        service.submit(world.tenant_id, job_spec)
    # act: the bound now says no room, so the jobs are counted: the refusal is exact
    with pytest.raises(TooManyRequests) as refused:
        service.submit(world.tenant_id, job_spec)
    # assert
    assert refused.value.extra["compute_in_use"] == 3 * size


def test_the_bound_follows_the_counters_and_voids_when_they_go_back() -> None:
    # arrange: a count of 5 jobs' room left and 100 compute in use, at counters (10, 1000)
    counted = CountedRooms()
    counted.put("t", (10, 1000), Room(jobs=5, compute=100))
    # act / assert: two more admissions of 30 since → at most 3 left, at least 160 in use
    assert counted.bound("t", (12, 1060)) == Room(jobs=3, compute=160)
    assert counted.bound("t", (9, 1000)) is None  # an older copy of the database
    assert counted.bound("t", None) is None  # a tenant whose compute counter is capped
    assert counted.bound("other", (12, 1060)) is None
