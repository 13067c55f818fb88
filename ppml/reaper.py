"""The reaper: settles jobs whose worker vanished and re-sends jobs whose message was lost.

Every worker runs it periodically; reaping is a conditional update under the budget lock, so
several reapers at once are harmless.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from celery import Celery

from ppml.config import Settings
from ppml.db.models import JobStatus, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.privacy.ledger import Ledger
from ppml.queue import enqueue_job
from ppml.runner import final_privacy

__all__ = ["ReapReport", "Reaper"]

log = logging.getLogger(__name__)

#: A job created this recently may simply not have been enqueued by its API request yet.
ENQUEUE_GRACE = timedelta(seconds=10)


@dataclass(frozen=True)
class ReapReport:
    lost: list[str]
    resent: list[str]


class Reaper:
    def __init__(self, db: Database, settings: Settings, celery: Celery) -> None:
        self.db, self.settings, self.celery = db, settings, celery
        self._stop = threading.Event()

    def run_once(self) -> ReapReport:
        lost = [job_id for job_id in self._expired() if self._settle_lost(job_id)]
        return ReapReport(lost=lost, resent=self._resend())

    def _expired(self) -> list[str]:
        with self.db.session() as session:
            return Repositories(session).expired_leases(utcnow())

    def _settle_lost(self, job_id: str) -> bool:
        """Fail a job whose lease expired, charging what it may have run."""
        with self.db.session() as session:
            found = Repositories(session).job_by_id(job_id)
        if found is None:
            return False
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            ledger = Ledger(repos)
            budget = ledger.lock(found.dataset_id)
            job = repos.job_by_id(job_id, lock=True)
            now = utcnow()
            expires = job.lease_expires_at if job else None
            if job is None or job.status != JobStatus.RUNNING or expires is None or expires >= now:
                return False  # renewed or finished meanwhile
            planned = int((job.privacy or {}).get("steps_planned") or job.steps_done)
            if job.heartbeat_at is None:
                steps = planned  # progress unknown: the whole reservation is spent
            else:
                steps = min(planned, job.steps_done + self.settings.worker.report_every_steps)
            if budget is not None:
                ledger.settle(budget, job.id, steps=steps, note="worker lost")
            job.status = JobStatus.FAILED
            job.error = {"code": "worker_lost", "message": "the worker stopped reporting"}
            job.finished_at = job.updated_at = now
            job.lease_expires_at = None
            if job.privacy is not None:
                job.privacy = final_privacy(job.privacy, steps, None)
        log.warning("job %s failed: worker lost; charged %d steps", job_id, steps)
        return True

    def _resend(self) -> list[str]:
        now = utcnow()
        with self.db.session() as session:
            ids = Repositories(session).unsent_jobs(
                created_before=now - ENQUEUE_GRACE,
                sent_before=now - timedelta(seconds=self.settings.worker.requeue_after_s),
            )
        resent = []
        for job_id in ids:
            if enqueue_job(self.celery, job_id):
                with self.db.session(write=True) as session:
                    Repositories(session).mark_enqueued(job_id)
                resent.append(job_id)
        return resent

    def start(self) -> threading.Thread:
        """Run every ``reaper_interval_s`` in a daemon thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.wait(self.settings.worker.reaper_interval_s):
                try:
                    report = self.run_once()
                    if report.lost or report.resent:
                        log.info("reaper: lost %s, resent %s", report.lost, report.resent)
                except Exception:
                    log.exception("reaper pass failed")

        thread = threading.Thread(target=loop, name="ppml-reaper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
