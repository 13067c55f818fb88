"""Concurrent admissions against one budget, on SQLite and PostgreSQL.

Why the lock exists: admission is check-then-act. It reads the dataset's committed and
reserved curves, checks that the new job still fits the filter, and inserts the job with its
RESERVE entry. Two requests that both read the totals before either writes each see room for
one more job and both insert: the budget is overspent, and the ``(ε, δ)`` promise to the
data owner is silently broken. ``JobService`` therefore re-reads the totals under a lock on
the budget row (``SELECT … FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite, which
ignores ``FOR UPDATE``) and checks and writes in that one transaction, so admissions on a
dataset are serialised. ``naive_admit`` below leaves the lock out, and the negative control
shows it overspending under the same race.

The number of repetitions of the race is ``PPML_LEDGER_REPEATS`` (default 3).
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select

from ppml.config import Settings
from ppml.db.models import Dataset, Job, JobStatus, LedgerEntry, LedgerKind, new_id
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import BudgetExceeded
from ppml.privacy import accounting as acc
from ppml.privacy import filters
from ppml.privacy.budgets import budget_filter
from ppml.privacy.ledger import Ledger
from ppml.queue import make_celery
from ppml.services.jobs import JobService
from ppml.services.pricing import price
from ppml.specs import JobSpec
from tests.integration.ledger_helpers import (
    DELTA,
    job_spec,
    make_dataset,
    make_tenant,
    within_filter,
)

REPEATS = int(os.environ.get("PPML_LEDGER_REPEATS", "3"))
SUBMISSIONS = 200
THREADS = 32
BUDGET_EPSILON = 8.0
EPOCHS = 3  # 60 steps at q = 0.05
NAIVE_SEQ = itertools.count(1)  # the negative control's entry numbers


def random_specs(dataset_id: str, seed: int) -> list[JobSpec]:
    """Jobs of ε in [0.3, 1.0] (on a 0.05 grid, so σ calibration is cached): several tens
    fit in ε = 8, not all 200."""
    rng = random.Random(seed)
    targets = [round(rng.uniform(0.3, 1.0) * 20) / 20 for _ in range(SUBMISSIONS)]
    return [job_spec(dataset_id, epsilon=eps, epochs=EPOCHS) for eps in targets]


def for_dataset(specs: list[JobSpec], dataset_id: str) -> list[JobSpec]:
    return [spec.model_copy(update={"dataset_id": dataset_id}) for spec in specs]


def used_curve(db: Database, dataset_id: str) -> tuple[acc.Curve, acc.Curve, acc.Curve]:
    """``(cached committed + reserved, folded committed, folded reserved)``."""
    with db.session() as session:
        ledger = Ledger(Repositories(session))
        budget = ledger.repos.budget(dataset_id)
        assert budget is not None
        cached = acc.add(tuple(budget.committed["units"]), tuple(budget.reserved["units"]))
        committed, reserved = ledger.fold(dataset_id)
    return cached, committed, reserved


def reserve_order(db: Database, dataset_id: str) -> list[str]:
    """Job ids in the order their reservations were written (admission is serialised, so
    the clock read under the lock orders them)."""
    stmt = (
        select(LedgerEntry.job_id)
        .where(LedgerEntry.dataset_id == dataset_id, LedgerEntry.kind == LedgerKind.RESERVE)
        .order_by(LedgerEntry.created_at, LedgerEntry.id)
    )
    with db.session() as session:
        return list(session.scalars(stmt).all())


class Monitor:
    """Samples the budget row while the race runs: the filter must hold at every read."""

    def __init__(self, db: Database, dataset_id: str, caps: acc.Curve) -> None:
        self.db, self.dataset_id, self.caps = db, dataset_id, caps
        self.stop = threading.Event()
        self.samples = 0
        self.violations: list[acc.Curve] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            cached, _committed, _reserved = used_curve(self.db, self.dataset_id)
            if not within_filter(cached, self.caps):
                self.violations.append(cached)
            self.samples += 1
            time.sleep(0.002)

    def __enter__(self) -> Monitor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def submit_all(service: JobService, tenant_id: str, specs: list[JobSpec]) -> list[str | None]:
    """Submit every spec, ``THREADS`` at a time; the admitted job's id, or None if refused."""

    def one(spec: JobSpec) -> str | None:
        try:
            job, _created = service.submit(tenant_id, spec)
        except BudgetExceeded:
            return None
        return job.id

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return list(pool.map(one, specs))


def submit_serially(service: JobService, tenant_id: str, specs: list[JobSpec]) -> list[bool]:
    admitted = []
    for spec in specs:
        try:
            service.submit(tenant_id, spec)
            admitted.append(True)
        except BudgetExceeded:
            admitted.append(False)
    return admitted


@pytest.fixture
def service(database: Database, settings: Settings) -> JobService:
    # memory:// broker: nothing is enqueued anywhere a worker could see it
    return JobService(database, settings, make_celery(settings))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("repeat", range(REPEATS))
def test_concurrent_admissions_equal_a_serial_replay(
    database: Database, service: JobService, repeat: int
) -> None:
    # arrange
    tenant_id, replay_tenant = make_tenant(database), make_tenant(database)
    raced = make_dataset(database, tenant_id, epsilon=BUDGET_EPSILON)
    replayed = make_dataset(database, replay_tenant, epsilon=BUDGET_EPSILON)
    specs = random_specs(raced.id, seed=repeat)
    for spec in specs:  # calibrate σ outside the race, as a warm server would have
        price(spec, raced, service.settings)
    caps = filters.new_filter(BUDGET_EPSILON, DELTA).caps()

    # act
    with Monitor(database, raced.id, caps) as monitor:
        outcome = submit_all(service, tenant_id, specs)
    order = reserve_order(database, raced.id)
    index = {job_id: i for i, job_id in enumerate(outcome) if job_id is not None}
    refused = [i for i, job_id in enumerate(outcome) if job_id is None]
    # The race serialised the decisions in some order; replay that order on a fresh budget:
    # the admitted jobs as their reservations were written, then the refused ones.
    replay_order = [index[job_id] for job_id in order] + refused
    replay = submit_serially(
        service, replay_tenant, for_dataset([specs[i] for i in replay_order], replayed.id)
    )

    # assert: several tens admitted, not all, exactly as serially
    admitted = len(index)
    assert 20 <= admitted < SUBMISSIONS
    assert sorted(order) == sorted(index)
    assert replay == [True] * admitted + [False] * len(refused)
    # the same budget is held, to the unit, and it is within the filter, and never was not
    raced_used, committed, reserved = used_curve(database, raced.id)
    replayed_used, _, _ = used_curve(database, replayed.id)
    assert raced_used == replayed_used == acc.add(committed, reserved)
    assert all(value >= 0 for value in reserved)
    assert within_filter(raced_used, caps)
    assert BUDGET_EPSILON - filters.new_filter(BUDGET_EPSILON, DELTA).epsilon(raced_used) >= 0
    assert monitor.samples > 0 and not monitor.violations


# ----------------------------------------------------------------------------- negative control


def naive_admit(
    db: Database,
    settings: Settings,
    tenant_id: str,
    dataset: Dataset,
    spec: JobSpec,
    *,
    pause: float,
) -> bool:
    """Admission WITHOUT the budget lock, for the negative control only.

    It reads the cached totals in one transaction, sums and compares, then inserts the job
    and its RESERVE entry in a second transaction and adds the curve to the totals it read.
    Every request that reads before the others write sees the same room and is admitted
    (time of check ≠ time of use), and the read-modify-write of the cache also loses
    updates. ``pause`` stands for whatever a real request does between the two (pricing,
    GC, a context switch); it only makes the race reliable, it does not create it.
    """
    pricing = price(spec, dataset, settings)
    assert pricing.event is not None
    curve = acc.rdp_curve(pricing.event)
    with db.session() as session:
        budget = Repositories(session).budget(dataset.id)  # no FOR UPDATE
        assert budget is not None
        reserved = tuple(budget.reserved["units"])
        used = acc.add(tuple(budget.committed["units"]), reserved)
        caps = budget_filter(budget).caps()
    if not acc.fits(used, curve, caps):
        return False
    time.sleep(pause)
    with db.session(write=True) as session:
        repos = Repositories(session)
        job = Job(
            id=new_id("job"),
            tenant_id=tenant_id,
            dataset_id=dataset.id,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            status=JobStatus.QUEUED,
            progress={"fraction": 0.0, "epoch": 0, "round": None, "steps": 0},
            metrics=None,
            privacy=None,
            error=None,
            request_hash="0" * 64,
        )
        repos.add(job)
        repos.add(
            LedgerEntry(
                id=new_id("led"),
                dataset_id=dataset.id,
                job_id=job.id,
                kind=LedgerKind.RESERVE,
                idempotency_key=f"{job.id}:{LedgerKind.RESERVE}",
                rdp={"grid": acc.GRID_VERSION, "units": list(curve)},
                event=pricing.event.to_dict(),
                epsilon=pricing.epsilon,
                # Nor does it chain its entries (the chain's head is read under the lock):
                # unlinked places, only unique, so the race stays the budget's.
                seq=next(NAIVE_SEQ),
                prev_hash="0" * 64,
                entry_hash="0" * 64,
            )
        )
        stale = repos.budget(dataset.id)  # a plain read: nothing stops the others
        assert stale is not None
        stale.reserved = {"grid": acc.GRID_VERSION, "units": list(acc.add(reserved, curve))}
    return True


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_naive_admission_overspends_without_the_lock(pg_database_url: str, tmp_path: Any) -> None:
    # arrange
    db = Database(pg_database_url)
    app_settings = Settings(
        data_dir=tmp_path / "data", database_url=pg_database_url, broker_url="memory://"
    )
    tenant_id = make_tenant(db)
    caps = filters.new_filter(BUDGET_EPSILON, DELTA).caps()
    broken = []
    try:
        for attempt in range(3):
            dataset = make_dataset(db, tenant_id, epsilon=BUDGET_EPSILON)
            specs = random_specs(dataset.id, seed=attempt)
            for spec in specs:
                price(spec, dataset, app_settings)

            # act
            def one(spec: JobSpec, dataset: Dataset = dataset) -> bool:
                return naive_admit(db, app_settings, tenant_id, dataset, spec, pause=0.05)

            with ThreadPoolExecutor(max_workers=THREADS) as pool:
                list(pool.map(one, specs))
            _cached, committed, reserved = used_curve(db, dataset.id)
            used = acc.add(committed, reserved)
            # over the cap at every order: no conversion can certify the budget any more
            broken.append(all(u > c for u, c in zip(used, caps, strict=True)))
            if broken[-1]:
                break
    finally:
        db.dispose()

    # assert
    assert any(broken), "the unlocked admission did not overspend; the race went unseen"
