"""The ledger itself refuses a charge in another privacy unit than its budget's.

Pricing refuses such jobs first (``tests/unit/test_privacy_units.py``); this is the defence
behind it: whatever reaches ``Ledger.reserve`` with the wrong unit writes nothing.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from ppml.db.models import Job, JobStatus, LedgerEntry, new_id
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import PrivacyUnitMismatch
from ppml.privacy import accounting as acc
from ppml.privacy.ledger import Ledger
from tests.integration.ledger_helpers import (
    job_spec,
    make_dataset,
    make_tenant,
    privacy_plan,
)


def test_a_mechanism_of_another_unit_is_refused_and_nothing_is_written(
    database: Database,
) -> None:
    # arrange: a record-unit budget and a client-level mechanism event
    dataset = make_dataset(database, make_tenant(database), epsilon=8.0)
    event = acc.MechanismEvent(sample_rate=0.1, noise_multiplier=2.0, steps=10, unit="client")
    job = Job(
        id=new_id("job"),
        tenant_id=dataset.tenant_id,
        dataset_id=dataset.id,
        name="wrong unit",
        spec=job_spec(dataset.id, epsilon=1.0, epochs=1),
        status=JobStatus.QUEUED,
        progress={"fraction": 0.0, "epoch": 0, "steps": 0},
        privacy=privacy_plan(event),
        request_hash="0" * 64,
    )
    # act
    with pytest.raises(PrivacyUnitMismatch), database.session(write=True) as session:
        repos = Repositories(session)
        ledger = Ledger(repos)
        budget = ledger.lock(dataset.id)
        assert budget is not None
        repos.stage(job)
        ledger.reserve(budget, job, event)
    # assert
    with database.session() as session:
        entries = session.scalar(select(func.count()).select_from(LedgerEntry))
        budget = Repositories(session).budget(dataset.id)
    assert entries == 0
    assert budget is not None and budget.reserved["units"] == list(acc.zero())
