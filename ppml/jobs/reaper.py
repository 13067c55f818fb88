"""The reaper: recovers jobs whose worker vanished and re-sends jobs (and the ingestion of
uploads still validating) whose message was lost.

A running job whose lease expired goes back to the queue, keeping its reservation, and its
next claim resumes from its last checkpoint; once it has been claimed ``max_attempts``
times it fails with ``worker_lost`` and is charged what it may have run. Every worker runs
the reaper periodically; reaping is a conditional update under the budget lock, so several
reapers at once are harmless.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from celery import Celery

from ppml.config import Settings
from ppml.db.models import JobStatus, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.jobs import lifecycle
from ppml.jobs.checkpoints import JobCheckpoints
from ppml.jobs.records import JobError
from ppml.jobs.schedule import steps_to_charge
from ppml.privacy import heads
from ppml.privacy.ledger import Ledger
from ppml.queue import enqueue_ingestion, enqueue_job
from ppml.storage import ArtifactStore

__all__ = ["ReapReport", "Reaper"]

log = logging.getLogger(__name__)

#: A job created this recently may simply not have been enqueued by its API request yet.
ENQUEUE_GRACE = timedelta(seconds=10)
#: Staged files and decrypted copies older than this were left by a process that died: they
#: may hold plain data, so they go (live ones last seconds, an upload's staging minutes).
STALE_TMP = timedelta(hours=24)


@dataclass(frozen=True)
class ReapReport:
    lost: list[str]  # settled: failed (out of attempts) or cancelled
    requeued: list[str]  # back in the queue, to resume from their checkpoints
    resent: list[str]
    # Validating datasets whose ingestion message was sent again.
    resent_datasets: list[str] = field(default_factory=list)


class Reaper:
    def __init__(self, db: Database, settings: Settings, celery: Celery) -> None:
        self.db, self.settings, self.celery = db, settings, celery
        heads.attach(db, settings)  # ledger appends move the signed chain heads
        self.store = ArtifactStore.for_settings(settings)
        self._stop = threading.Event()

    def run_once(self) -> ReapReport:
        lost, requeued = [], []
        for job_id in self._expired():
            outcome = self._recover(job_id)
            if outcome == "requeued":
                requeued.append(job_id)
            elif outcome is not None:
                lost.append(job_id)
        for job_id in requeued:
            self._send(job_id)
        try:
            self.store.sweep(older_than_s=STALE_TMP.total_seconds())
        except OSError:
            log.exception("sweeping the store's tmp folder failed")
        return ReapReport(
            lost=lost,
            requeued=requeued,
            resent=self._resend(),
            resent_datasets=self._resend_ingestions(),
        )

    def _expired(self) -> list[str]:
        with self.db.session() as session:
            return Repositories(session).expired_leases(utcnow())

    def _recover(self, job_id: str) -> str | None:
        """Re-queue a job whose lease expired, or settle it.

        Returns ``"requeued"``; ``"failed"`` (out of attempts: ``worker_lost``);
        ``"cancelled"`` (its cancel had been asked for); or None when the lease was renewed
        or the job finished meanwhile. A settled job is charged per
        :func:`~ppml.services.pricing.steps_to_charge`.
        """
        with self.db.session() as session:
            found = Repositories(session).job_by_id(job_id)
        if found is None:
            return None
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            Ledger(repos).lock(found.dataset_id)  # lock order: budget row, then job row
            job = repos.job_by_id(job_id, lock=True)
            now = utcnow()
            expires = job.lease_expires_at if job else None
            if job is None or job.status != JobStatus.RUNNING or expires is None or expires >= now:
                return None
            # Claims that ended in a preemption were no failure of the job's.
            lost_attempts = job.attempts - job.preemptions
            if lost_attempts < self.settings.worker.max_attempts and not job.cancel_requested:
                # The reservation stays: the job will still run at most its planned steps.
                lifecycle.requeue(repos, job)
                log.warning("job %s: worker lost on attempt %d; re-queued", job_id, job.attempts)
                return "requeued"
            steps = steps_to_charge(job, report_every=self.settings.worker.report_every_steps)
            if job.cancel_requested:
                ending = lifecycle.Ending(
                    status=JobStatus.CANCELLED, steps=steps, note="worker lost"
                )
            else:
                error = JobError(
                    code="worker_lost",
                    message=f"the worker stopped reporting ({lost_attempts} attempts)",
                )
                ending = lifecycle.Ending(
                    status=JobStatus.FAILED, steps=steps, note="worker lost", error=error
                )
            lifecycle.finish(repos, job, ending)
            outcome = str(job.status)
        JobCheckpoints(self.store, job_id).clear()
        log.warning("job %s %s: worker lost; charged %s steps", job_id, outcome, steps)
        return outcome

    def _send(self, job_id: str) -> bool:
        if not enqueue_job(self.celery, job_id):
            return False  # still unsent: a later pass re-sends it
        with self.db.session(write=True) as session:
            Repositories(session).mark_enqueued(job_id)
        return True

    def _resend(self) -> list[str]:
        now = utcnow()
        with self.db.session() as session:
            ids = Repositories(session).unsent_jobs(
                created_before=now - ENQUEUE_GRACE,
                sent_before=now - timedelta(seconds=self.settings.worker.requeue_after_s),
            )
        return [job_id for job_id in ids if self._send(job_id)]

    def _resend_ingestions(self) -> list[str]:
        """Send again the ingestion of uploads still validating after ``requeue_after_s``
        and not being validated (a lost message or worker); a duplicate finds the dataset
        done, or held by a live attempt, and exits."""
        now, worker = utcnow(), self.settings.worker
        with self.db.session() as session:
            ids = Repositories(session).unsent_ingestions(
                sent_before=now - timedelta(seconds=worker.requeue_after_s),
                started_before=now - timedelta(seconds=worker.ingest_lease_s),
            )
        resent = []
        for dataset_id in ids:
            if enqueue_ingestion(self.celery, dataset_id):
                with self.db.session(write=True) as session:
                    Repositories(session).mark_ingest_sent(dataset_id)
                resent.append(dataset_id)
        return resent

    def start(self) -> threading.Thread:
        """Run every ``reaper_interval_s`` in a daemon thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.wait(self.settings.worker.reaper_interval_s):
                try:
                    report = self.run_once()
                    if report.lost or report.requeued or report.resent or report.resent_datasets:
                        log.info("reaper: %s", report)
                except Exception:
                    log.exception("reaper pass failed")

        thread = threading.Thread(target=loop, name="ppml-reaper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
