"""Concurrent batches of PATE answers against one budget, on SQLite and PostgreSQL.

Charging an answer is check-then-act like admission: read the totals, check the filter,
append the entries. :func:`ppml.services.pate.charge_answers` does it under the budget row's
lock that admission takes, so concurrent batches are decided one after the other: exactly
as many are charged as fit when they come one by one, the cached totals equal the fold of
the entries, and the hash chain holds.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ppml.config import Settings
from ppml.db.models import Dataset, JobStatus, new_id
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import BudgetExceeded
from ppml.jobs import lifecycle
from ppml.jobs.records import PrivacyRecord, Progress
from ppml.privacy import accounting as acc
from ppml.privacy import gnmax
from ppml.privacy.budgets import budget_filter
from ppml.privacy.filters import BudgetFilter
from ppml.privacy.ledger import Ledger
from ppml.services.pate import charge_answers
from ppml.services.tenants import Principal
from ppml.specs import JobSpec
from ppml.trust.keys import SigningKeys
from tests.integration.ledger_helpers import DELTA, make_dataset, make_tenant

SIGMA = 15.0
BATCH = 3
REQUESTS = 40
THREADS = 12


def _succeeded_pate_job(db: Database, tenant_id: str, dataset: Dataset) -> str:
    """A pate job whose teachers exist (no file is read: charges never touch them)."""
    spec = JobSpec.model_validate(
        {
            "name": "pate",
            "dataset_id": dataset.id,
            "kind": "pate",
            "model": {"arch": "logreg"},
            "training": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1},
            "privacy": None,
            "pate": {"teachers": 5, "sigma": SIGMA},
        }
    )
    privacy = PrivacyRecord(
        target_epsilon=0.0,
        epsilon_planned=0.0,
        epsilon_spent=0.0,
        delta=DELTA,
        noise_multiplier=SIGMA,
        max_grad_norm=0.0,
        sample_rate=1.0,
        steps=0,
        steps_planned=0,
        unit="record",
        grid_version=acc.GRID_VERSION,
        mechanism="gnmax",
    )
    job = lifecycle.new_job(
        id=new_id("job"),
        tenant_id=tenant_id,
        dataset_id=dataset.id,
        name=spec.name,
        spec=spec,
        progress=Progress(fraction=1.0, epoch=0, steps=0),
        metrics=None,
        privacy=privacy,
        error=None,
        request_hash="0" * 64,
    )
    job.status = JobStatus.SUCCEEDED  # the worker's part is not under test here
    with db.session(write=True) as session:
        Repositories(session).add(job)
    return job.id


def _fitting_batches(check: BudgetFilter) -> int:
    """How many batches the budget's filter admits when they come one by one."""
    batch = acc.rdp_curve(gnmax.gnmax_event(BATCH, SIGMA))
    used, count = acc.zero(), 0
    while check.fits(used, batch):
        used, count = acc.add(used, batch), count + 1
    return count


def _filter(database: Database, dataset_id: str) -> BudgetFilter:
    with database.session() as session:
        budget = Repositories(session).budget(dataset_id)
    assert budget is not None
    return budget_filter(budget)


def test_concurrent_batches_charge_exactly_what_fits(
    database: Database, settings: Settings
) -> None:
    # arrange
    tenant_id = make_tenant(database)
    dataset = make_dataset(database, tenant_id, epsilon=2.0)
    job_id = _succeeded_pate_job(database, tenant_id, dataset)
    by = Principal(tenant_id=tenant_id, role="analyst")
    keys = SigningKeys.for_settings(settings)
    check = _filter(database, dataset.id)
    expected = _fitting_batches(check)
    assert 0 < expected < REQUESTS

    def ask(_: int) -> bool:
        try:
            charge_answers(database, job_id=job_id, queries=BATCH, by=by, keys=keys)
        except BudgetExceeded:
            return False
        return True

    # act
    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = list(pool.map(ask, range(REQUESTS)))
    # assert
    assert sum(outcomes) == expected
    with database.session() as session:
        repos = Repositories(session)
        ledger = Ledger(repos)
        assert ledger.verify() == []  # the cache is the fold of the entries
        assert ledger.verify_chains() == []
        entries = [e for e in repos.ledger_entries(dataset.id) if e.job_id == job_id]
        job = repos.job_by_id(job_id)
    assert sorted(e.kind for e in entries) == ["commit"] * expected + ["reserve"] * expected
    committed = acc.add(*[tuple(e.rdp["units"]) for e in entries if e.kind == "commit"])
    assert check.fits(acc.zero(), committed)
    assert job is not None and job.privacy is not None
    assert job.privacy.queries == BATCH * expected
