"""The reaper on its own: jobs whose worker vanished go back to the queue or are settled, and
jobs whose message was lost are sent again; on the real databases (SQLite and PostgreSQL)
and a real Celery app on kombu's in-process ``memory://`` broker. Nothing here trains: the
workers only claim and report, through the runner's own methods."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import update

from ppml.config import Settings, WorkerSettings
from ppml.db.models import Job, JobStatus, LedgerKind, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.jobs.reaper import ENQUEUE_GRACE, Reaper
from ppml.jobs.records import Progress
from ppml.jobs.runner import JobRunner
from ppml.jobs.schedule import steps_to_charge
from ppml.privacy import accounting as acc
from ppml.queue import RUN_JOB, make_celery
from ppml.services.datasets import BudgetRequest, register_builtin
from ppml.services.jobs import JobService
from ppml.services.tenants import create_tenant
from ppml.specs import JobSpec
from ppml.storage import ArtifactStore
from tests.unit.worlds import Reads

REPORT_EVERY = 5


@dataclass
class World(Reads):
    """A tenant with budgeted digits, the admission service, a reaper and a worker."""

    settings: Settings
    celery: Celery
    service: JobService
    reaper: Reaper
    worker: JobRunner
    tenant_id: str
    dataset_id: str

    def submit(self, *, epochs: int = 2) -> str:
        spec = JobSpec.model_validate(
            {
                "name": "tiny",
                "dataset_id": self.dataset_id,
                "model": {"arch": "logreg"},
                "training": {"epochs": epochs, "batch_size": 64, "learning_rate": 0.1},
                "privacy": {"target_epsilon": 1.0, "delta": 1e-5},
            }
        )
        job, _created = self.service.submit(self.tenant_id, spec)
        return job.id

    def claimed(self, *, reported: int | None = None) -> str:
        """A job this test's worker claimed and (``reported``) reported progress on."""
        job_id = self.submit()
        assert self.worker.claim(job_id) is not None
        if reported is not None:
            progress = Progress(fraction=0.1, epoch=0, steps=reported)
            assert self.worker.heartbeat(job_id, progress, reported) == (True, False)
        return job_id

    def budget_totals(self) -> tuple[Any, Any]:
        with self.db.session() as session:
            budget = Repositories(session).budget(self.dataset_id)
        assert budget is not None
        return budget.committed["units"], budget.reserved["units"]

    def set_times(self, job_id: str, **times: datetime | None) -> None:
        """Move a job's clock fields (lease, creation, sending) instead of waiting."""
        with self.db.session(write=True) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(**times)
                .execution_options(synchronize_session=False)
            )

    def expire_lease(self, job_id: str) -> None:
        self.set_times(job_id, lease_expires_at=utcnow() - timedelta(seconds=1))

    def sent(self) -> list[str]:
        """Job ids of the run_job messages waiting in this test's queue (drains it)."""
        ids = []
        with self.celery.connection_for_read() as conn:
            queue = conn.SimpleQueue(self.settings.worker.queue, no_ack=True)
            while True:
                try:
                    message = queue.get(block=False)
                except queue.Empty:
                    break
                assert message.headers["task"] == RUN_JOB
                args, _kwargs, _embed = message.payload
                ids.append(args[0])
            queue.close()
        return ids


def make_world(database: Database, settings: Settings, **worker: Any) -> World:
    fields = {
        "report_every_steps": REPORT_EVERY,
        "queue": f"training-{secrets.token_hex(4)}",  # the memory broker is process-wide
        **worker,
    }
    settings = settings.model_copy(update={"worker": WorkerSettings(**fields)})
    store = ArtifactStore.for_settings(settings)
    with database.session(write=True) as session:
        repos = Repositories(session)
        tenant = create_tenant(repos, name=f"t-{secrets.token_hex(4)}")
        dataset = register_builtin(
            repos,
            store,
            settings,
            tenant_id=tenant.id,
            name="digits",
            builtin="digits",
            budget=BudgetRequest(epsilon=20.0, delta=1e-5),
        )
    celery = make_celery(settings)
    return World(
        db=database,
        settings=settings,
        celery=celery,
        service=JobService(database, settings, celery),
        reaper=Reaper(database, settings, celery),
        worker=JobRunner(database, settings, owner="worker-a"),
        tenant_id=tenant.id,
        dataset_id=dataset.id,
    )


@pytest.fixture
def world(database: Database, settings: Settings) -> Iterator[World]:
    world = make_world(database, settings)
    yield world
    world.sent()  # leave nothing in the process-wide memory broker


# ----------------------------------------------------------------------------- lost workers


def test_an_expired_lease_with_attempts_left_is_requeued_keeping_its_reservation(
    world: World,
) -> None:
    # arrange: attempt 1 of 3 reported progress, then its worker vanished
    job_id = world.claimed(reported=REPORT_EVERY)
    world.expire_lease(job_id)
    totals = world.budget_totals()
    world.sent()
    # act
    report = world.reaper.run_once()
    # assert: back in the queue without a lease, and sent to the workers again
    job = world.job(job_id)
    assert report.requeued == [job_id] and report.lost == []
    assert job.status == JobStatus.QUEUED and job.attempts == 1
    assert job.lease_owner is None and job.lease_expires_at is None
    assert job.enqueued_at is not None and job.finished_at is None
    assert world.sent() == [job_id]
    # the reservation stays whole: nothing settled yet
    assert [e.kind for e in world.job_ledger(job_id)] == [LedgerKind.RESERVE]
    assert world.budget_totals() == totals
    # the lost worker is no longer the owner when it comes back
    progress = Progress(fraction=0.2, epoch=0, steps=2 * REPORT_EVERY)
    assert world.worker.heartbeat(job_id, progress, 2 * REPORT_EVERY)[0] is False


@pytest.mark.parametrize("reported", [None, REPORT_EVERY], ids=["unknown", "reported"])
def test_an_expired_lease_at_max_attempts_fails_worker_lost_and_commits_the_steps_to_charge(
    database: Database, settings: Settings, reported: int | None
) -> None:
    # arrange: a job claimed once, with one attempt allowed
    world = make_world(database, settings, max_attempts=1)
    job_id = world.claimed(reported=reported)
    world.expire_lease(job_id)
    privacy = world.job(job_id).privacy
    assert privacy is not None
    planned = privacy.steps_planned
    expected = steps_to_charge(world.job(job_id), report_every=REPORT_EVERY)
    # act
    report = world.reaper.run_once()
    # assert: the whole plan while progress was unknown, else the report plus one interval
    assert expected == (planned if reported is None else 2 * REPORT_EVERY)
    job = world.job(job_id)
    assert report.lost == [job_id] and report.requeued == []
    assert job.status == JobStatus.FAILED and job.error is not None
    assert job.error.code == "worker_lost" and "1 attempts" in job.error.message
    assert job.lease_owner is None and job.finished_at is not None
    entries = {e.kind: e for e in world.job_ledger(job_id)}
    assert sorted(entries) == ["commit", "release", "reserve"]
    commit = entries[LedgerKind.COMMIT]
    assert acc.MechanismEvent.from_dict(commit.event).steps == expected
    assert job.steps_done == expected
    assert job.privacy is not None and job.privacy.steps == expected
    assert job.privacy.ledger_entry_id == commit.id
    assert world.budget_totals()[1] == list(acc.zero())  # nothing stays reserved
    assert world.sent() == [job_id]  # only admission's message: a settled job is not sent


def test_an_expired_lease_of_a_job_asked_to_cancel_ends_cancelled_even_with_attempts_left(
    world: World,
) -> None:
    # arrange: the analyst cancelled the running job; then its worker vanished
    job_id = world.claimed(reported=REPORT_EVERY)
    world.service.cancel(world.tenant_id, job_id)
    world.expire_lease(job_id)
    world.sent()
    # act
    report = world.reaper.run_once()
    # assert: settled as cancelled (not re-queued), charged like a lost worker
    job = world.job(job_id)
    assert report.lost == [job_id] and report.requeued == []
    assert job.status == JobStatus.CANCELLED and job.error is None
    entries = {e.kind: e for e in world.job_ledger(job_id)}
    assert sorted(entries) == ["commit", "release", "reserve"]
    assert acc.MechanismEvent.from_dict(entries[LedgerKind.COMMIT].event).steps == 2 * REPORT_EVERY
    assert job.privacy is not None and job.privacy.ledger_entry_id == entries[LedgerKind.COMMIT].id
    assert world.sent() == []


def test_a_lease_renewed_after_the_reaper_listed_it_as_expired_is_left_alone(
    world: World,
) -> None:
    # arrange: the reaper sees the lease expired; the worker's next beat renews it
    job_id = world.claimed(reported=REPORT_EVERY)
    world.expire_lease(job_id)
    assert world.reaper._expired() == [job_id]
    progress = Progress(fraction=0.2, epoch=0, steps=2 * REPORT_EVERY)
    assert world.worker.heartbeat(job_id, progress, 2 * REPORT_EVERY) == (True, False)
    before = world.job(job_id)
    # act: the reaper goes on with the job it listed
    outcome = world.reaper._recover(job_id)
    # assert: re-checked under the lock, so nothing changes
    after = world.job(job_id)
    assert outcome is None
    assert after.status == JobStatus.RUNNING and after.lease_owner == "worker-a"
    assert after.lease_expires_at == before.lease_expires_at and after.attempts == 1
    assert [e.kind for e in world.job_ledger(job_id)] == [LedgerKind.RESERVE]


def test_a_running_job_with_a_live_lease_is_not_reaped(world: World) -> None:
    # arrange
    job_id = world.claimed(reported=REPORT_EVERY)
    world.sent()
    # act
    report = world.reaper.run_once()
    # assert
    assert (report.lost, report.requeued, report.resent) == ([], [], [])
    assert world.job(job_id).status == JobStatus.RUNNING
    assert world.sent() == []


# ----------------------------------------------------------------------------- lost messages


def test_a_queued_job_that_was_never_sent_is_sent_again_after_the_grace_period(
    world: World,
) -> None:
    # arrange: two admissions whose sends failed (as JobService.enqueue records it), one
    # older than the grace period, one just made (its API request may still be sending it)
    old, new = world.submit(), world.submit()
    world.sent()
    with world.db.session(write=True) as session:
        for job_id in (old, new):
            Repositories(session).mark_enqueued(job_id, sent=False)
    world.set_times(old, created_at=utcnow() - ENQUEUE_GRACE - timedelta(seconds=1))
    # act
    report = world.reaper.run_once()
    # assert: only the old one is sent, and marked sent
    assert report.resent == [old]
    assert world.sent() == [old]
    assert world.job(old).enqueued_at is not None
    assert world.job(new).enqueued_at is None
    assert world.job(old).status == JobStatus.QUEUED


def test_a_job_still_queued_long_after_it_was_sent_is_sent_again(world: World) -> None:
    # arrange: a broker restart lost the message of a job sent long ago
    job_id = world.submit()
    world.sent()
    long_ago = utcnow() - timedelta(seconds=world.settings.worker.requeue_after_s + 1)
    world.set_times(job_id, enqueued_at=long_ago)
    # act
    report = world.reaper.run_once()
    # assert: sent again, with a fresh time so the next pass leaves it alone
    assert report.resent == [job_id] and world.sent() == [job_id]
    job = world.job(job_id)
    assert job.enqueued_at is not None and job.enqueued_at > long_ago
    assert world.reaper.run_once().resent == []


def test_a_cancelled_job_is_never_sent_again(world: World) -> None:
    # arrange: an unsent job, cancelled while queued
    job_id = world.submit()
    world.sent()
    with world.db.session(write=True) as session:
        Repositories(session).mark_enqueued(job_id, sent=False)
    world.set_times(job_id, created_at=utcnow() - ENQUEUE_GRACE - timedelta(seconds=1))
    world.service.cancel(world.tenant_id, job_id)
    # act
    report = world.reaper.run_once()
    # assert
    assert report.resent == [] and world.sent() == []
