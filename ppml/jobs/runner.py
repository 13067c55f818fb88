"""Running one job on a worker: claim, train, publish the model, end it (ppml.jobs.lifecycle).

Idempotent by construction: a job is claimed with a conditional update, so a duplicate
delivery of the same message finds it taken (or finished) and does nothing; the ledger's
idempotency keys make a retried settlement harmless. A message is a turn: the worker claims
the job fair sharing picks (``lifecycle.claim_next``), which need not be the one it names.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ppml.config import Settings
from ppml.db.models import Dataset, Job, JobStatus, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import UNAVAILABLE, Database
from ppml.jobs import lifecycle
from ppml.jobs.attempt import publish_model, train_attempt
from ppml.jobs.checkpoints import JobCheckpoints
from ppml.jobs.federation import train_federation_job
from ppml.jobs.heartbeat import Heartbeat, progress_at
from ppml.jobs.inputs import JobInputs
from ppml.jobs.pate import pate_ending
from ppml.jobs.records import (
    Artifacts,
    JobError,
    Progress,
)
from ppml.jobs.schedule import Schedule, evaluation_plan, schedule, unreported_steps
from ppml.jobs.synthesis import synthesis_ending
from ppml.privacy import heads
from ppml.privacy.evaluation import (
    WITHHELD,
    EvaluationPlan,
    ExactMetrics,
    ExactScores,
    ReleasedMetrics,
    release_outcome,
)
from ppml.privacy.ledger import Ledger
from ppml.storage import ArtifactStore
from ppml.trust.keys import SigningKeys
from ppml.trust.sealing import DataKeys

if TYPE_CHECKING:
    from ppml.jobs.attempt import Outcome

__all__ = ["ClaimUnavailable", "JobRunner", "worker_identity"]

log = logging.getLogger(__name__)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ClaimUnavailable(RuntimeError):
    """The database was unavailable while claiming: the task retries the claim later."""


class JobRunner:
    """Runs jobs for one worker process."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        owner: str | None = None,
        enqueue: Callable[[str], bool] | None = None,
    ) -> None:
        """``enqueue`` sends a preempted job's message (False: not sent; the reaper will)."""
        self.db, self.settings = db, settings
        self.owner = owner or worker_identity()
        heads.attach(db, settings)  # ledger appends move the signed chain heads
        # Seals datasets and checkpoints at rest, and opens the datasets' split secrets.
        self.data_keys = DataKeys.from_settings(settings)
        # The data dir, or the object store shared with the API and the other workers.
        self.store = ArtifactStore.for_settings(settings)
        # Signs the receipts of released models (the keyring the API serves).
        self.keys = SigningKeys.for_settings(settings, self.store)
        self.inputs = JobInputs(db, self.store, self.data_keys)
        self.enqueue = enqueue

    def _lease_until(self) -> datetime:
        return utcnow() + timedelta(seconds=self.settings.worker.lease_seconds)

    def heartbeat(
        self, job_id: str, progress: Progress, steps: int, scores: ExactScores | None = None
    ) -> tuple[bool, bool]:
        """Record progress (and held-out ``scores``, for the owner) under the lease:
        ``(still the owner, cancel requested)``."""
        with self.db.session(write=True) as session:
            return Repositories(session).heartbeat(
                job_id,
                owner=self.owner,
                lease_until=self._lease_until(),
                progress=progress,
                steps=steps,
                scores=scores.model_dump(mode="json") if scores is not None else None,
            )

    def claim(self, sent_for: str) -> tuple[Job, Dataset] | None:
        """queued → running for this worker: the job fair sharing picks now, or None when no
        job is queued. ``sent_for`` is the job the message named (for the log).

        Raises:
            ClaimUnavailable: the database could not be reached; nothing was claimed.
        """
        try:
            with self.db.session(write=True) as session:
                repos = Repositories(session)
                lease = self._lease_until()
                job_id = lifecycle.claim_next(repos, sent_for, owner=self.owner, lease_until=lease)
                job = repos.job_by_id(job_id) if job_id else None
                dataset = repos.dataset_by_id(job.dataset_id) if job else None
        except UNAVAILABLE as exc:
            raise ClaimUnavailable(f"job {sent_for}: database unavailable at claim") from exc
        if job is None or dataset is None:
            return None
        if job.id != sent_for:
            log.info("job %s: its turn goes to job %s (fair sharing)", sent_for, job.id)
        return job, dataset

    def run(self, sent_for: str) -> str:
        """Take a turn: run the queued job fair sharing picks (``sent_for`` is the job the
        message named). Returns the job's final status, ``"preempted"``, ``"lost"`` or
        ``"skipped"`` (no job queued)."""
        claimed = self.claim(sent_for)
        if claimed is None:
            log.info("job %s is not queued; nothing to do", sent_for)
            return "skipped"
        job, dataset = claimed
        job_id = job.id
        spec = job.spec
        if spec.kind == "synthesize":  # one mechanism run, no steps (ppml.jobs.synthesis)
            ending = synthesis_ending(
                self.store,
                job,
                dataset,
                arrays=lambda: self.inputs.arrays(dataset),
                renew=lambda: self.heartbeat(job_id, job.progress, 0),
                lease_seconds=self.settings.worker.lease_seconds,
            )
            return "lost" if ending is None else self._finish(job, ending)
        if spec.kind == "pate":  # teachers, no steps and no charge (ppml.jobs.pate)
            ending = pate_ending(
                self.store,
                job,
                dataset,
                arrays=lambda: self.inputs.arrays(dataset),
                secret=lambda: self.inputs.secret(dataset),
                renew=lambda: self.heartbeat(job_id, job.progress, 0),
                lease_seconds=self.settings.worker.lease_seconds,
                public=self.inputs.public_arrays,
            )
            return "lost" if ending is None else self._finish(job, ending)
        limit = spec.training.max_runtime_s or self.settings.worker.job_time_limit_s
        limit = min(limit, self.settings.worker.job_time_limit_s)  # per attempt
        plan = schedule(spec, dataset)  # the same schedule the job was priced with
        checkpoints = JobCheckpoints(self.store, job.id)
        # A re-run (the reaper re-queued it after its worker was lost) resumes from the
        # newest checkpoint; without one it starts over (see JobCheckpoints).
        resume = checkpoints.latest(before=job.attempts) if job.attempts > 1 else None
        start = int(resume["steps"]) if resume is not None else 0
        log.info("job %s claimed (attempt %d), starting at step %d", job_id, job.attempts, start)
        beat = self._heartbeat(job, plan, start, limit)
        # Progress is "known" from the first beat on: a lost worker is charged what it
        # reported plus one reporting interval instead of its whole reservation.
        beat.beat()

        def save_checkpoint(state: dict[str, Any]) -> None:
            if not beat.lost:  # a worker that lost the job keeps its hands off
                checkpoints.save(job.attempts, state)

        try:
            result = self._train(job, dataset, plan, beat, save_checkpoint, resume)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            report_every = self.settings.worker.report_every_steps
            unreported = unreported_steps(job.privacy, report_every=report_every)
            ending = lifecycle.Ending(
                status=JobStatus.FAILED,
                steps=min(plan.total_steps, beat.steps_reported + unreported),
                note="failed",
                error=JobError(code="training_error", message=type(exc).__name__),
            )
            return self._finish(job, ending)
        if beat.lost:
            log.warning("job %s: lease lost; another worker owns it now", job_id)
            return "lost"
        if result.stopped and beat.preempted and not (beat.cancel or beat.timed_out):
            return self._yield(job, result.steps_done)
        try:
            ending = self._ending(job, dataset, plan, beat, result, limit)
        except Exception as exc:  # publishing the model failed (storage): end it, don't hide it
            log.exception("job %s: could not publish its model", job_id)
            ending = lifecycle.Ending(
                status=JobStatus.FAILED,
                steps=result.steps_done,
                note="failed",
                error=JobError(code="publish_error", message=type(exc).__name__),
            )
        return self._finish(job, ending)

    def _heartbeat(self, job: Job, plan: Schedule, start: int, limit: float) -> Heartbeat:
        fed = job.spec.federated
        privacy = job.privacy

        def epsilon_of(steps: int) -> float | None:
            # Training alone: the evaluation releases happen at the end.
            return privacy.model_copy(update={"evaluation": None}).spent(steps) if privacy else None

        def contended() -> bool:
            wait = timedelta(seconds=self.settings.worker.preempt_after_wait_s)
            with self.db.session() as session:
                repos = Repositories(session)
                return repos.others_waiting(job.tenant_id, queued_before=utcnow() - wait)

        return Heartbeat(
            self.heartbeat,
            job.id,
            deadline=time.monotonic() + limit,
            lease_seconds=self.settings.worker.lease_seconds,
            last=progress_at(start, plan, local_epochs=fed.local_epochs if fed else None),
            epsilon_of=epsilon_of,
            steps_reported=start,
            time_slice=self.settings.worker.time_slice_s,
            contended=contended,
        )

    def _yield(self, job: Job, steps: int) -> str:
        """Give the worker to another tenant's job: back to queued, resumed from the
        checkpoint written at this step; not charged now, and not a lost attempt."""
        try:
            with self.db.session(write=True) as session:
                repos = Repositories(session)
                row = repos.job_by_id(job.id, lock=True)
                if row is None or row.status != JobStatus.RUNNING or row.lease_owner != self.owner:
                    return "skipped"
                lifecycle.preempt(repos, row)
        except UNAVAILABLE:
            log.warning("job %s: database unavailable at preemption; left to the reaper", job.id)
            return "lost"
        log.info("job %s preempted at step %d: another tenant's job waits", job.id, steps)
        if self.enqueue is not None and self.enqueue(job.id):
            with self.db.session(write=True) as session:
                Repositories(session).mark_enqueued(job.id)
        return "preempted"

    def _ending(
        self,
        job: Job,
        dataset: Dataset,
        plan: Schedule,
        beat: Heartbeat,
        result: Outcome,
        limit: float,
    ) -> lifecycle.Ending:
        """How a training run that returned ends: its status, metrics, files and receipt."""
        status, error, note = JobStatus.SUCCEEDED, None, "succeeded"
        if result.stopped and beat.cancel:
            status, note = JobStatus.CANCELLED, "cancelled"
        elif result.stopped and beat.timed_out:
            status, note = JobStatus.FAILED, "failed"
            error = JobError(code="time_limit", message=f"stopped after {limit} s")
        if job.spec.federation_id is not None:  # no evaluation at the nodes yet (#16)
            released = ReleasedMetrics(metrics=None, history=None, exact=ExactMetrics())
        else:
            released = release_outcome(
                result.metrics, getattr(result, "history", None), self._evaluation(job, dataset)
            )
        fed = job.spec.federated
        progress = progress_at(
            result.steps_done, plan, local_epochs=fed.local_epochs if fed else None
        )
        ending = lifecycle.Ending(
            status=status,
            steps=result.steps_done,
            note=note,
            error=error,
            progress=progress,
            released=released,
        )
        if status != JobStatus.SUCCEEDED:
            return ending  # models are published for succeeded jobs only
        privacy = job.privacy.finished(result.steps_done, None) if job.privacy else None
        # A keyring that cannot sign fails here, as a failed publish, not at the finish.
        self.keys.active()
        statistics = self.inputs.statistics(dataset) if job.spec.preprocessing.standardize else None
        artifacts, receipt = publish_model(
            self.store, job, dataset, result, privacy, released, statistics
        )
        return replace(ending, artifacts=artifacts, receipt=receipt)

    @staticmethod
    def _evaluation(job: Job, dataset: Dataset) -> EvaluationPlan:
        """How this job's metrics are released: as priced (private jobs), else by its data."""
        if job.privacy is not None:
            return job.privacy.evaluation or WITHHELD
        return evaluation_plan(job.spec, dataset)

    def _train(
        self,
        job: Job,
        dataset: Dataset,
        plan: Schedule,
        beat: Heartbeat,
        checkpoint: Callable[[dict[str, Any]], None],
        resume: dict[str, Any] | None,
    ) -> Outcome:
        """Train one attempt (``ppml.jobs.attempt``); a seam the runner's tests wrap."""
        if job.spec.federation_id is not None:  # rounds over remote nodes (#16)
            return train_federation_job(
                job, dataset, self.db, self.store, beat=beat, checkpoint=checkpoint, resume=resume
            )
        report_every = self.settings.worker.report_every_steps
        return train_attempt(
            job,
            dataset,
            self.inputs,
            plan,
            beat=beat,
            checkpoint=checkpoint,
            resume=resume,
            report_every=report_every,
        )

    def _finish(self, job: Job, ending: lifecycle.Ending) -> str:
        """End the job through the lifecycle, if it is still this worker's.

        A database outage here is waited out for up to a lease: the job is this worker's
        until its lease runs out, and after that the reaper settles it.
        """
        deadline = time.monotonic() + self.settings.worker.lease_seconds
        while True:
            try:
                return self._finish_once(job, ending)
            except UNAVAILABLE:
                if time.monotonic() > deadline:
                    self._discard(ending.artifacts)
                    log.error("job %s: database unavailable at finish; left to the reaper", job.id)
                    return "lost"
                log.warning("job %s: database unavailable at finish; retrying", job.id)
                time.sleep(1.0)

    def _finish_once(self, job: Job, ending: lifecycle.Ending) -> str:
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            Ledger(repos).lock(job.dataset_id)  # lock order: budget row, then job row
            row = repos.job_by_id(job.id, lock=True)
            if row is None or JobStatus(row.status).terminal or row.lease_owner != self.owner:
                self._discard(ending.artifacts)
                return "skipped"
            lifecycle.finish(repos, row, ending, keys=self.keys)
        JobCheckpoints(self.store, job.id).clear()  # a finished job never resumes
        log.info("job %s %s after %s steps", job.id, ending.status.value, ending.steps)
        return ending.status.value

    def _discard(self, artifacts: Artifacts | None) -> None:
        """Delete this attempt's files: the job is another attempt's, or finished already."""
        for fmt in artifacts.formats() if artifacts is not None else []:
            ref = artifacts.get(fmt) if artifacts is not None else None
            if ref is not None:
                self.store.delete(ref.key)
