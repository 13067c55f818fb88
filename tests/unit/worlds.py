"""Reads the component tests of the job lifecycle share (runner, reaper, job service)."""

from __future__ import annotations

from dataclasses import dataclass

from ppml.db.models import Job, LedgerEntry
from ppml.db.repositories import Repositories
from ppml.db.session import Database


@dataclass
class Reads:
    """Fresh reads of what a component under test wrote."""

    db: Database

    def job(self, job_id: str) -> Job:
        with self.db.session() as session:
            job = Repositories(session).job_by_id(job_id)
        assert job is not None
        return job

    def job_ledger(self, job_id: str) -> list[LedgerEntry]:
        with self.db.session() as session:
            return list(Repositories(session).job_ledger_entries(job_id))
