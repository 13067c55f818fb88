"""Fair sharing of workers between tenants, on the real databases: which queued job a free
worker claims, and a running job yielding its worker to another tenant's (preemption)."""

from __future__ import annotations

import pytest

from ppml.config import Settings
from ppml.db.models import JobStatus
from ppml.db.session import Database
from ppml.jobs.reaper import Reaper
from ppml.jobs.runner import JobRunner
from ppml.queue import make_celery
from tests.unit.worlds import RunnerWorld, make_world, worker_settings


def _claimed(runner: JobRunner, sent_for: str) -> str:
    claimed = runner.claim(sent_for)
    assert claimed is not None
    return claimed[0].id


def _tenants(database: Database, settings: Settings) -> tuple[RunnerWorld, RunnerWorld]:
    return make_world(database, settings), make_world(database, settings)


def test_a_free_worker_claims_for_the_tenant_with_fewest_running_jobs(
    database: Database, settings: Settings
) -> None:
    # arrange: tenant A queued two jobs before tenant B queued one
    a, b = _tenants(database, worker_settings(settings))
    a1, a2 = a.submit(private=False), a.submit(private=False)
    b1 = b.submit(private=False)
    runner = JobRunner(a.db, a.settings, owner="worker")
    # act: three turns, the messages naming A's jobs first
    order = [_claimed(runner, a1), _claimed(runner, a2), _claimed(runner, b1)]
    # assert: A's second job waits while A runs one and B none
    assert order == [a1, b1, a2]
    assert runner.claim(b1) is None  # a turn with nothing queued claims nothing


def test_a_free_worker_serves_the_tenant_served_longest_ago(
    database: Database, settings: Settings
) -> None:
    # arrange: A's first job has run; A and B each have one queued, neither runs any
    a, b = _tenants(database, worker_settings(settings))
    first = a.submit(private=False)
    runner = JobRunner(a.db, a.settings, owner="worker")
    assert runner.run(first) == "succeeded"
    a2, b1 = a.submit(private=False), b.submit(private=False)
    # act: the message names A's job
    claimed = _claimed(runner, a2)
    # assert: B, never served, goes first
    assert claimed == b1
    assert a.job(a2).status == JobStatus.QUEUED


def test_a_running_job_yields_to_another_tenant_and_resumes_charged_once(
    database: Database, settings: Settings
) -> None:
    # arrange: a time slice shorter than one report; B's job has waited long enough
    fair = worker_settings(settings, time_slice_s=1e-6, preempt_after_wait_s=0)
    a, b = _tenants(database, fair)
    long_job = a.submit(private=True, epochs=3)
    short_job = b.submit(private=True)
    sent: list[str] = []
    runner = JobRunner(a.db, a.settings, owner="worker", enqueue=lambda j: bool(sent.append(j)))
    # act 1: A's job runs its first report, then yields
    assert runner.run(long_job) == "preempted"
    # assert 1: queued again where its checkpoint is, nothing charged, its message re-sent
    yielded = a.job(long_job)
    assert yielded.status == JobStatus.QUEUED and yielded.lease_owner is None
    assert yielded.attempts == 1 and yielded.preemptions == 1
    assert 0 < yielded.steps_done < a.plan(long_job).total_steps
    assert a.checkpoints(long_job) == [1]
    assert [e.kind for e in a.job_ledger(long_job)] == ["reserve"]
    assert sent == [long_job]
    # act 2: the re-sent message is a turn; B's job goes first (within its slice), then A's
    # resumes
    patient = JobRunner(a.db, worker_settings(settings, time_slice_s=None), owner="worker")
    assert patient.run(long_job) == "succeeded"
    assert b.job(short_job).status == JobStatus.SUCCEEDED
    assert patient.run(long_job) == "succeeded"
    # assert 2: resumed from the checkpoint; every planned step charged exactly once
    done = a.job(long_job)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 2
    assert done.steps_done == a.plan(long_job).total_steps
    assert done.privacy is not None and done.privacy.steps == done.privacy.steps_planned
    entries = a.job_ledger(long_job)
    assert sorted(e.kind for e in entries) == ["commit", "release", "reserve"]
    assert a.checkpoints(long_job) == []


def test_a_job_does_not_yield_to_its_own_tenants_jobs(
    database: Database, settings: Settings
) -> None:
    # arrange: the slice is over at once, but only the same tenant waits
    world = make_world(database, worker_settings(settings, time_slice_s=1e-6))
    first, second = world.submit(private=False, epochs=3), world.submit(private=False)
    runner = JobRunner(world.db, world.settings, owner="worker")
    # act
    outcome = runner.run(first)
    # assert
    assert outcome == "succeeded" and world.job(first).preemptions == 0
    assert world.job(second).status == JobStatus.QUEUED


@pytest.mark.parametrize(("preempted", "reaped"), [(True, "queued"), (False, "failed")])
def test_a_preemption_is_not_an_attempt_the_worker_lost(
    database: Database, settings: Settings, preempted: bool, reaped: str
) -> None:
    # arrange: two attempts allowed; the first claim ends in a preemption (or is lost too)
    fair = worker_settings(settings, max_attempts=2, time_slice_s=1e-6, preempt_after_wait_s=0)
    a, b = _tenants(database, fair)
    job_id = a.submit(private=True, epochs=3)
    runner = JobRunner(a.db, a.settings, owner="worker")
    reaper = Reaper(a.db, a.settings, make_celery(a.settings))
    if preempted:
        b.service.cancel(b.tenant_id, b.submit(private=False))  # waited, then went away
        other = b.submit(private=False)
        assert runner.run(job_id) == "preempted"
        patient = JobRunner(a.db, worker_settings(settings, time_slice_s=None), owner="worker")
        assert patient.run(other) == "succeeded"
    else:
        assert _claimed(runner, job_id) == job_id
        a.expire_lease(job_id)
        assert reaper.run_once().requeued == [job_id]
    # act: the next claim's worker is lost
    assert _claimed(runner, job_id) == job_id
    a.expire_lease(job_id)
    reaper.run_once()
    # assert: a preempted claim leaves an attempt; two lost ones fail the job
    job = a.job(job_id)
    assert job.status == reaped and job.attempts == 2
