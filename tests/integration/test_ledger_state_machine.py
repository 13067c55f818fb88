"""A Hypothesis state machine over the budget ledger, on SQLite and PostgreSQL.

Operations are the lifecycle of PRIVACY.md: reserve (the ledger directly, or the admission
service), start (claim), progress (heartbeat), cancel, crash, lease expiry, commit, and a
retried commit. A model tracks what each job should have charged; after every step the
database must agree with the model and with the fold of its own entries, and the filter
invariant must hold.

One database per test (built by the migrations), one fresh dataset per example. Which
paths a random run reaches varies (Hypothesis switches rules off per example), so a second,
scripted test walks every path once through the same machine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import update

from ppml.config import Settings
from ppml.db.models import (
    Job,
    JobStatus,
    LedgerKind,
    new_id,
    utcnow,
)
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import BudgetExceeded, JobNotCancellable
from ppml.jobs import lifecycle
from ppml.jobs.reaper import Reaper
from ppml.jobs.records import Progress
from ppml.jobs.runner import JobRunner
from ppml.privacy import accounting as acc
from ppml.privacy import filters
from ppml.privacy.budgets import budget_status
from ppml.privacy.heads import HeadFile, flush_all
from ppml.privacy.ledger import Ledger
from ppml.queue import make_celery
from ppml.services.jobs import JobService
from ppml.services.pricing import price
from tests.integration.ledger_helpers import (
    BATCH,
    DELTA,
    NUM_TRAIN,
    job_spec,
    make_dataset,
    make_tenant,
    privacy_plan,
    within_filter,
)

MACHINE_SETTINGS = hypothesis_settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ----------------------------------------------------------------------------- helpers


def progress(steps: int) -> Progress:
    """A progress report of ``steps`` steps (the machine only tracks the step count)."""
    return Progress(fraction=0.0, epoch=0, steps=steps)


def worker_finish(runner: JobRunner, row: Job, status: JobStatus, *, steps: int) -> str:
    """The runner's last act after training (settle the ledger, set the status), without
    the training: ``_finish`` is where ``JobRunner.run`` ends on every path."""
    with runner.db.session() as session:
        dataset = Repositories(session).dataset_by_id(row.dataset_id)
    assert dataset is not None
    ending = lifecycle.Ending(status=status, steps=steps, note=status.value)
    return runner._finish(row, ending)


def expire_lease(db: Database, job_id: str) -> None:
    """The worker vanished: its lease runs out (moved into the past here, not waited for)."""
    with db.session(write=True) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
            .execution_options(synchronize_session=False)
        )


@dataclass
class ModelJob:
    """What the test believes about one job."""

    id: str
    event: acc.MechanismEvent
    reserved: acc.Curve
    status: JobStatus = JobStatus.QUEUED
    owner: str | None = None
    reported: int = 0
    heartbeats: int = 0  # progress is unknown to the reaper until the first one
    attempts: int = 0  # claims; the reaper re-queues a lost job until the limit
    cancel_requested: bool = False
    committed_steps: int | None = None  # None until settled
    untouched: bool = False  # settled without its data ever touched: fully released

    @property
    def planned(self) -> int:
        return self.event.steps

    @property
    def committed(self) -> acc.Curve:
        """The charge the ledger must hold for this job (settle caps it at the reservation)."""
        if self.committed_steps is None or self.untouched:
            return acc.zero()
        # A job that touched its data is charged its steps and its metric releases, even
        # at 0 steps (it may have scored its model before its first step).
        run = acc.rdp_curve(self.event.with_steps(min(self.committed_steps, self.planned)))
        return tuple(min(a, b) for a, b in zip(run, self.reserved, strict=True))


class Harness:
    """The services and workers one test's machines share."""

    def __init__(self, db: Database, app_settings: Settings) -> None:
        self.db, self.settings = db, app_settings
        celery = make_celery(app_settings)  # broker memory://: sends nowhere
        self.service = JobService(db, app_settings, celery)
        self.reaper = Reaper(db, app_settings, celery)
        self.workers = {name: JobRunner(db, app_settings, owner=name) for name in ("w1", "w2")}
        self.report_every = app_settings.worker.report_every_steps
        self.max_attempts = app_settings.worker.max_attempts
        self.seen: Counter[str] = Counter()  # outcomes, to show which paths ran


def machine_class(h: Harness) -> type[RuleBasedStateMachine]:
    db, service, workers, seen = h.db, h.service, h.workers, h.seen

    class LedgerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.jobs: dict[str, ModelJob] = {}
            self.last_spent = 0.0

        # --- setup ----------------------------------------------------------------
        @initialize(epsilon=st.sampled_from([1.5, 3.0, 6.0]))
        def open_dataset(self, epsilon: float) -> None:
            # a fresh tenant too: queued jobs of earlier examples count against its job cap
            self.tenant_id = make_tenant(db)
            self.dataset = make_dataset(db, self.tenant_id, epsilon=epsilon)
            self.caps = filters.new_filter(epsilon, DELTA).caps()

        # --- model helpers ----------------------------------------------------------
        def model_totals(self) -> tuple[acc.Curve, acc.Curve]:
            committed, reserved = acc.zero(), acc.zero()
            for job in self.jobs.values():
                if job.committed_steps is None:
                    reserved = acc.add(reserved, job.reserved)
                else:
                    committed = acc.add(committed, job.committed)
            return committed, reserved

        def model_admits(self, curve: acc.Curve) -> bool:
            return within_filter(acc.add(*self.model_totals(), curve), self.caps)

        def in_status(self, *statuses: JobStatus) -> list[str]:
            # creation order: ids made in the same millisecond sort at random, and a replayed
            # example must pick the same jobs
            return [j.id for j in self.jobs.values() if j.status in statuses]

        def has(self, *statuses: JobStatus) -> bool:
            return bool(self.in_status(*statuses))

        def db_job(self, job_id: str) -> Job | None:
            with db.session() as session:
                return Repositories(session).job_by_id(job_id)

        # --- actions (the rules below draw their arguments; the scripted test calls these)
        def do_reserve(self, sigma: float, steps: int) -> str | None:
            """Reserve on a locked budget through the ledger, as admission does."""
            mechanism = acc.MechanismEvent(
                sample_rate=BATCH / NUM_TRAIN, noise_multiplier=sigma, steps=steps
            )
            curve = acc.rdp_curve(mechanism)
            expected = self.model_admits(curve)
            job = Job(
                id=new_id("job"),
                tenant_id=self.tenant_id,
                dataset_id=self.dataset.id,
                name="direct",
                spec=job_spec(self.dataset.id, epsilon=1.0, epochs=steps // 20).model_dump(
                    mode="json"
                ),
                status=JobStatus.QUEUED,
                progress={"fraction": 0.0, "epoch": 0, "round": None, "steps": 0},
                privacy=privacy_plan(mechanism),
                metrics=None,
                error=None,
                request_hash="0" * 64,
            )
            try:
                with db.session(write=True) as session:
                    repos = Repositories(session)
                    ledger = Ledger(repos)
                    budget = ledger.lock(self.dataset.id)
                    assert budget is not None
                    repos.add(job)
                    ledger.reserve(budget, job, mechanism)
            except BudgetExceeded:
                assert not expected, "the ledger refused a job the filter admits"
                assert self.db_job(job.id) is None, "a refused reservation left its job"
                seen["reserve: refused"] += 1
                return None
            assert expected, "the ledger admitted a job the filter refuses"
            seen["reserve: admitted"] += 1
            self.jobs[job.id] = ModelJob(id=job.id, event=mechanism, reserved=curve)
            return job.id

        def do_submit(self, epsilon: float, epochs: int) -> str | None:
            """Admission through the service (prices, locks, reserves, enqueues)."""
            spec = job_spec(self.dataset.id, epsilon=epsilon, epochs=epochs)
            mechanism = price(spec, self.dataset, h.settings).event
            assert mechanism is not None
            curve = acc.rdp_curve(mechanism)
            expected = self.model_admits(curve)
            try:
                job, created = service.submit(self.tenant_id, spec)
            except BudgetExceeded as refusal:
                assert not expected, "admission refused a job the filter admits"
                assert refusal.extra["epsilon_requested"] > 0
                seen["submit: refused"] += 1
                return None
            assert expected, "admission admitted a job the filter refuses"
            assert created and job.status == JobStatus.QUEUED
            seen["submit: admitted"] += 1
            self.jobs[job.id] = ModelJob(id=job.id, event=mechanism, reserved=curve)
            return job.id

        def do_start(self, job_id: str, worker: str) -> None:
            job = self.jobs[job_id]
            with db.session(write=True) as session:
                claimed = lifecycle.claim(
                    Repositories(session),
                    job.id,
                    owner=worker,
                    lease_until=utcnow() + timedelta(minutes=1),
                )
            # only a queued job can be claimed, and only once (duplicate deliveries)
            assert claimed == (job.status == JobStatus.QUEUED)
            if claimed:
                job.status, job.owner = JobStatus.RUNNING, worker
                job.attempts += 1
            seen["start: claimed" if claimed else "start: taken"] += 1

        def do_progress(self, job_id: str, reports: int) -> None:
            job = self.jobs[job_id]
            steps = min(job.planned, job.reported + reports * h.report_every)
            assert job.owner is not None
            owner, cancel = workers[job.owner].heartbeat(job.id, progress(steps), steps)
            assert owner and cancel == job.cancel_requested
            job.reported, job.heartbeats = steps, job.heartbeats + 1
            seen["progress"] += 1

        def do_cancel(self, job_id: str) -> None:
            job = self.jobs[job_id]
            try:
                row = service.cancel(self.tenant_id, job.id)
            except JobNotCancellable:
                assert job.status.terminal
                seen["cancel: terminal"] += 1
                return
            seen[f"cancel: {job.status.value}"] += 1
            assert not job.status.terminal
            job.cancel_requested = True
            if job.status == JobStatus.QUEUED:
                # never touched: the whole reservation goes back; re-queued after a lost
                # worker: charged like a lost worker
                job.status = JobStatus.CANCELLED
                job.committed_steps = self.stop_charge(job) if job.attempts else 0
                job.untouched = not job.attempts
                if job.attempts:
                    seen["cancel: requeued"] += 1
            assert row.status == job.status

        def do_crash(self, job_id: str) -> None:
            """Training raised: the runner charges what was reported plus one interval."""
            job = self.jobs[job_id]
            self.finish(job, JobStatus.FAILED, min(job.planned, job.reported + h.report_every))

        def stop_charge(self, job: ModelJob) -> int:
            """A touched job stopped from outside: the whole reservation when no progress
            was ever reported, else what was reported plus one interval."""
            if not job.heartbeats:
                return job.planned
            return min(job.planned, job.reported + h.report_every)

        def do_expire(self, job_id: str) -> None:
            """The worker vanished: the reaper re-queues the job (its reservation stays)
            until it was claimed ``max_attempts`` times, then settles it."""
            job = self.jobs[job_id]
            expire_lease(db, job.id)
            outcome = h.reaper._recover(job.id)
            if job.attempts < h.max_attempts and not job.cancel_requested:
                assert outcome == "requeued"
                job.status = JobStatus.QUEUED
                seen["lease expiry: requeued"] += 1
            else:
                status = JobStatus.CANCELLED if job.cancel_requested else JobStatus.FAILED
                assert outcome == status.value
                job.status, job.committed_steps = status, self.stop_charge(job)
                seen["lease expiry: " + ("reported" if job.heartbeats else "unknown")] += 1
            # the lost worker comes back: it is no longer the owner, and settles nothing
            assert job.owner is not None
            assert (
                workers[job.owner].heartbeat(job.id, progress(job.planned), job.planned)[0] is False
            )

        def do_complete(self, job_id: str, steps: int | None = None) -> None:
            """The worker finishes: all steps, or (a cancel seen at a report) ``steps``."""
            job = self.jobs[job_id]
            if job.cancel_requested:
                assert steps is not None and job.reported <= steps <= job.planned
                self.finish(job, JobStatus.CANCELLED, steps)
            else:
                self.finish(job, JobStatus.SUCCEEDED, job.planned)

        def finish(self, job: ModelJob, status: JobStatus, steps: int) -> None:
            assert job.owner is not None
            row = self.db_job(job.id)
            assert row is not None
            outcome = worker_finish(workers[job.owner], row, status, steps=steps)
            assert outcome == status.value
            job.status, job.committed_steps = status, steps
            seen[f"finish: {status.value}"] += 1

        def do_retry(self, job_id: str, steps: int) -> None:
            """A redelivered settlement (any step count), a late worker and a late cancel are
            no-ops."""
            job = self.jobs[job_id]
            with db.session(write=True) as session:
                repos = Repositories(session)
                ledger = Ledger(repos)
                budget = ledger.lock(self.dataset.id)
                assert budget is not None
                before = (budget.committed, budget.reserved, budget.version)
                commit, release = ledger.settle(budget, job.id, steps=steps, note="retry")
                assert (budget.committed, budget.reserved, budget.version) == before
                existing = {e.kind: e.id for e in repos.job_ledger_entries(job.id)}
            assert (commit.id if commit else None) == existing.get(LedgerKind.COMMIT)
            assert release is not None and release.id == existing[LedgerKind.RELEASE]
            for runner in workers.values():
                row = self.db_job(job.id)
                assert row is not None
                late = worker_finish(runner, row, JobStatus.SUCCEEDED, steps=steps)
                assert late == "skipped"
            seen["retried commit"] += 1
            self.do_cancel(job.id)  # too late to cancel: 409, nothing changes

        # --- rules ------------------------------------------------------------------
        @rule(sigma=st.sampled_from([1.5, 2.5, 4.0]), steps=st.sampled_from([20, 60, 100, 200]))
        def reserve(self, sigma: float, steps: int) -> None:
            self.do_reserve(sigma, steps)

        @rule(epsilon=st.sampled_from([0.3, 0.7, 1.5]), epochs=st.sampled_from([1, 3, 10]))
        def submit(self, epsilon: float, epochs: int) -> None:
            self.do_submit(epsilon, epochs)

        @precondition(lambda self: self.has(*ACTIVE))
        @rule(data=st.data(), worker=st.sampled_from(["w1", "w2"]))
        def start(self, data: st.DataObject, worker: str) -> None:
            self.do_start(data.draw(st.sampled_from(self.in_status(*ACTIVE))), worker)

        @precondition(lambda self: self.has(JobStatus.RUNNING))
        @rule(data=st.data(), reports=st.integers(min_value=1, max_value=3))
        def progress(self, data: st.DataObject, reports: int) -> None:
            self.do_progress(data.draw(st.sampled_from(self.in_status(JobStatus.RUNNING))), reports)

        @precondition(lambda self: self.has(*ACTIVE))
        @rule(data=st.data())
        def cancel(self, data: st.DataObject) -> None:
            self.do_cancel(data.draw(st.sampled_from(self.in_status(*ACTIVE))))

        @precondition(lambda self: self.has(JobStatus.RUNNING))
        @rule(data=st.data())
        def crash(self, data: st.DataObject) -> None:
            self.do_crash(data.draw(st.sampled_from(self.in_status(JobStatus.RUNNING))))

        @precondition(lambda self: self.has(JobStatus.RUNNING))
        @rule(data=st.data())
        def lease_expiry(self, data: st.DataObject) -> None:
            self.do_expire(data.draw(st.sampled_from(self.in_status(JobStatus.RUNNING))))

        @precondition(lambda self: self.has(JobStatus.RUNNING))
        @rule(data=st.data())
        def commit(self, data: st.DataObject) -> None:
            job = self.jobs[data.draw(st.sampled_from(self.in_status(JobStatus.RUNNING)))]
            steps = data.draw(st.integers(min_value=job.reported, max_value=job.planned))
            self.do_complete(job.id, steps)

        @precondition(lambda self: self.has(*TERMINAL))
        @rule(data=st.data(), steps=st.integers(min_value=0, max_value=400))
        def retried_commit(self, data: st.DataObject, steps: int) -> None:
            self.do_retry(data.draw(st.sampled_from(self.in_status(*TERMINAL))), steps)

        # --- invariants -----------------------------------------------------------
        def budget_and_fold(self) -> tuple[Any, acc.Curve, acc.Curve]:
            with db.session() as session:
                ledger = Ledger(Repositories(session))
                budget = ledger.repos.budget(self.dataset.id)
                committed, reserved = ledger.fold(self.dataset.id)
            return budget, committed, reserved

        @invariant()
        def cache_equals_fold_and_model(self) -> None:
            budget, committed, reserved = self.budget_and_fold()
            assert tuple(budget.committed["units"]) == committed
            assert tuple(budget.reserved["units"]) == reserved
            assert (committed, reserved) == self.model_totals()

        @invariant()
        def filter_holds(self) -> None:
            _budget, committed, reserved = self.budget_and_fold()
            assert all(value >= 0 for value in reserved)
            assert within_filter(acc.add(committed, reserved), self.caps)

        @invariant()
        def each_job_settles_at_most_once(self) -> None:
            with db.session() as session:
                repos = Repositories(session)
                for job in self.jobs.values():
                    kinds = [e.kind for e in repos.job_ledger_entries(job.id)]
                    assert kinds.count(LedgerKind.RESERVE) == 1
                    assert kinds.count(LedgerKind.COMMIT) <= 1
                    assert kinds.count(LedgerKind.RELEASE) <= 1
                    assert (LedgerKind.RELEASE in kinds) == (job.committed_steps is not None)
                    assert (LedgerKind.COMMIT in kinds) == any(job.committed)

        @invariant()
        def statuses_match(self) -> None:
            with db.session() as session:
                repos = Repositories(session)
                for job in self.jobs.values():
                    row = repos.job_by_id(job.id)
                    assert row is not None and row.status == job.status

        @invariant()
        def spent_never_decreases(self) -> None:
            budget, _committed, _reserved = self.budget_and_fold()
            spent = budget_status(budget).epsilon_spent
            assert spent >= self.last_spent
            self.last_spent = spent

        @invariant()
        def chain_holds_and_its_head_is_signed(self) -> None:
            """Every path appends to the hash chain, and its commit moves the signed head."""
            with db.session() as session:
                ledger = Ledger(Repositories(session))
                assert ledger.verify_chains() == []
                head = ledger.head(self.dataset.id)
            assert flush_all()  # commits hand their heads to a writer thread
            signed = HeadFile.of(h.settings).read().get(self.dataset.id)
            assert signed == (head if head.seq else None)

        def check(self) -> None:
            """Every invariant (the scripted test calls this after each action)."""
            self.cache_equals_fold_and_model()
            self.filter_holds()
            self.each_job_settles_at_most_once()
            self.statuses_match()
            self.spent_never_decreases()
            self.chain_holds_and_its_head_is_signed()

    return LedgerMachine


ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
EVERY_PATH = {
    "reserve: refused",
    "reserve: admitted",
    "submit: refused",
    "submit: admitted",
    "start: claimed",
    "start: taken",
    "progress",
    "cancel: queued",
    "cancel: running",
    "cancel: terminal",
    "lease expiry: unknown",
    "lease expiry: reported",
    "lease expiry: requeued",
    "cancel: requeued",
    "finish: failed",
    "finish: succeeded",
    "finish: cancelled",
    "retried commit",
}


@pytest.mark.timeout(300)
def test_ledger_state_machine(database: Database, settings: Settings) -> None:
    # arrange
    harness = Harness(database, settings)
    # act: random interleavings; the invariants are asserted after every step
    run_state_machine_as_test(machine_class(harness), settings=MACHINE_SETTINGS)
    # assert: the run was not vacuous (which paths ran varies; the test below pins them all)
    seen = harness.seen
    assert seen["submit: admitted"] + seen["reserve: admitted"] > 0, dict(seen)
    assert seen["finish: succeeded"] + seen["finish: failed"] + seen["cancel: queued"] > 0


def test_every_lifecycle_path_keeps_the_invariants(database: Database, settings: Settings) -> None:
    """One scripted walk through every path, checked the same way as the random runs."""
    # arrange
    harness = Harness(database, settings)
    machine: Any = machine_class(harness)()
    machine.open_dataset(epsilon=3.0)

    def step(action: Any, *args: Any) -> Any:
        result = action(*args)
        machine.check()
        return result

    # act
    queued = step(machine.do_submit, 0.3, 1)
    step(machine.do_cancel, queued)  # before start: full release
    cancelled = step(machine.do_reserve, 2.5, 100)
    step(machine.do_start, cancelled, "w1")
    step(machine.do_start, cancelled, "w2")  # a duplicate delivery finds it taken
    step(machine.do_progress, cancelled, 1)
    step(machine.do_cancel, cancelled)  # running: the worker stops at its next report
    step(machine.do_complete, cancelled, 60)
    for reports in (0, 1):  # lost worker on every attempt, progress unknown / reported
        lost = step(machine.do_submit, 0.3, 10)
        for _attempt in range(harness.max_attempts):  # re-queued, then failed
            step(machine.do_start, lost, "w2")
            if reports:
                step(machine.do_progress, lost, reports)
            step(machine.do_expire, lost)
    requeued = step(machine.do_submit, 0.3, 3)
    step(machine.do_start, requeued, "w1")
    step(machine.do_progress, requeued, 1)
    step(machine.do_expire, requeued)  # back in the queue, data touched
    step(machine.do_cancel, requeued)  # charged what was reported plus one interval
    crashed = step(machine.do_reserve, 4.0, 60)
    step(machine.do_start, crashed, "w1")
    step(machine.do_crash, crashed)
    done = step(machine.do_submit, 0.3, 3)
    step(machine.do_start, done, "w1")
    step(machine.do_progress, done, 3)
    step(machine.do_complete, done)
    for job_id in (queued, cancelled, lost, requeued, crashed, done):
        step(machine.do_retry, job_id, 7)
    while step(machine.do_submit, 1.5, 10) is not None:
        pass
    while step(machine.do_reserve, 1.5, 200) is not None:
        pass
    # assert
    assert set(harness.seen) >= EVERY_PATH, sorted(EVERY_PATH - set(harness.seen))
