"""Jobs: admit (reserve budget), enqueue, quote, cancel.

Admission keeps σ calibration outside the lock: the dataset is read and the job priced in a
short read transaction, then a writer transaction locks the budget row, re-checks the filter
on the newest totals, and inserts the job and its RESERVE entry together.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy.exc import IntegrityError

from ppml.checkpoints import JobCheckpoints
from ppml.config import Settings
from ppml.db.models import Dataset, Job, JobStatus, new_id, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import (
    BudgetExceeded,
    IdempotencyMismatch,
    JobNotCancellable,
    NotFound,
    TooManyRequests,
)
from ppml.privacy import accounting as acc
from ppml.privacy.ledger import Ledger, budget_status
from ppml.queue import enqueue_job
from ppml.services.pricing import Pricing, price, steps_to_charge
from ppml.specs import JobSpec, request_hash
from ppml.storage import ArtifactStore

__all__ = ["JobService", "Quote"]


@dataclass(frozen=True, kw_only=True)
class Quote:
    epsilon: float
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int
    fits_budget: bool
    epsilon_remaining: float | None
    max_target_epsilon: float | None


def _check_same_request(job: Job, digest: str) -> None:
    if job.request_hash != digest:
        raise IdempotencyMismatch(
            "this Idempotency-Key was used with another request body", field="Idempotency-Key"
        )


class JobService:
    """Use cases on jobs. It owns its transactions, to keep calibration outside the lock."""

    def __init__(self, db: Database, settings: Settings, celery: Celery) -> None:
        self.db, self.settings, self.celery = db, settings, celery
        # Datasets never change after registration, so admission need not re-read them.
        self._datasets: dict[tuple[str, str], Dataset] = {}

    def _dataset(self, repos: Repositories, tenant_id: str, dataset_id: str) -> Dataset:
        dataset = self._datasets.get((tenant_id, dataset_id))
        if dataset is None:
            dataset = repos.dataset(tenant_id, dataset_id)
            if dataset is None:
                raise NotFound("dataset not found", field="dataset_id")
            if len(self._datasets) > 10_000:
                self._datasets.clear()
            self._datasets[(tenant_id, dataset_id)] = dataset
        return dataset

    def _priced(self, tenant_id: str, spec: JobSpec) -> tuple[Dataset, Pricing]:
        with self.db.session() as session:
            dataset = self._dataset(Repositories(session), tenant_id, spec.dataset_id)
        return dataset, price(spec, dataset, self.settings)

    def _check_active_jobs(self, tenant_id: str) -> None:
        # A soft limit, checked outside the budget lock: a burst may overshoot it slightly.
        limit = self.settings.limits.max_active_jobs_per_tenant
        with self.db.session() as session:
            active = Repositories(session).count_active_jobs(tenant_id)
        if active >= limit:
            raise TooManyRequests(
                f"at most {limit} queued or running jobs per tenant; retry when some finish",
                limit=limit,
                retry_after=30,
            )

    def _largest_fitting(self, dataset: Dataset, pricing: Pricing) -> float | None:
        """After a refusal, outside any lock: the largest target ε of this shape that fits."""
        if pricing.event is None:
            return None
        with self.db.session() as session:
            ledger = Ledger(Repositories(session))
            budget = ledger.repos.budget(dataset.id)
            assert budget is not None
            return ledger.largest_fitting(budget, pricing.event)

    def quote(self, tenant_id: str, spec: JobSpec) -> Quote:
        dataset, pricing = self._priced(tenant_id, spec)
        fits, remaining, largest = True, None, None
        if pricing.event is not None and dataset.epsilon_total is not None:
            with self.db.session() as session:
                ledger = Ledger(Repositories(session))
                budget = ledger.repos.budget(dataset.id)
                assert budget is not None
                fits = ledger.admits(budget, acc.rdp_curve(pricing.event))
                remaining = budget_status(budget).epsilon_remaining
                if not fits:
                    largest = ledger.largest_fitting(budget, pricing.event)
        event = pricing.event
        return Quote(
            epsilon=pricing.epsilon,
            delta=pricing.delta,
            noise_multiplier=event.noise_multiplier if event else None,
            sample_rate=event.sample_rate if event else None,
            steps=pricing.schedule.total_steps,
            fits_budget=fits,
            epsilon_remaining=remaining,
            max_target_epsilon=largest,
        )

    def submit(
        self, tenant_id: str, spec: JobSpec, *, idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """Admit and enqueue a job. Returns ``(job, created)``; replays return ``created=False``."""
        dataset, pricing = self._priced(tenant_id, spec)
        digest = request_hash(spec)
        if idempotency_key is None:
            self._check_active_jobs(tenant_id)
        try:
            job, created = self._admit(tenant_id, dataset, spec, pricing, digest, idempotency_key)
        except BudgetExceeded as refusal:
            refusal.extra["max_target_epsilon"] = self._largest_fitting(dataset, pricing)
            raise
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the insert.
            assert idempotency_key is not None
            job, created = self._replay(tenant_id, idempotency_key, digest), False
        if created:
            self.enqueue(job.id)
        return job, created

    def _replay(self, tenant_id: str, key: str, digest: str) -> Job:
        with self.db.session() as session:
            job = Repositories(session).job_by_idempotency_key(tenant_id, key)
        assert job is not None
        _check_same_request(job, digest)
        return job

    def _admit(
        self,
        tenant_id: str,
        dataset: Dataset,
        spec: JobSpec,
        pricing: Pricing,
        digest: str,
        idempotency_key: str | None,
    ) -> tuple[Job, bool]:
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            ledger = Ledger(repos)
            # Lock first: a duplicate with the same key is then serialised behind us.
            budget = ledger.lock(dataset.id) if pricing.event is not None else None
            if idempotency_key is not None:
                existing = repos.job_by_idempotency_key(tenant_id, idempotency_key)
                if existing is not None:
                    _check_same_request(existing, digest)
                    return existing, False
                self._check_active_jobs(tenant_id)  # only for a new job, not for a replay
            job = Job(
                id=new_id("job"),
                tenant_id=tenant_id,
                dataset_id=dataset.id,
                name=spec.name,
                spec=spec.model_dump(mode="json"),
                status=JobStatus.QUEUED,
                progress={"fraction": 0.0, "epoch": 0, "round": None, "steps": 0},
                metrics=None,
                privacy=pricing.privacy_plan(spec),
                error=None,
                idempotency_key=idempotency_key,
                request_hash=digest,
                # Marked sent now, saving a write after the send; a failed send clears it.
                enqueued_at=utcnow(),
            )
            repos.add(job)
            if budget is not None and pricing.event is not None:
                ledger.reserve(budget, job, pricing.event)
        return job, True

    def enqueue(self, job_id: str) -> None:
        """Send the job; if the broker is down, leave it to the reaper, which re-sends it."""
        if not enqueue_job(self.celery, job_id):
            with self.db.session(write=True) as session:
                Repositories(session).mark_enqueued(job_id, sent=False)

    def cancel(self, tenant_id: str, job_id: str) -> Job:
        """Queued → cancelled with a full release; running → asks the worker to stop."""
        with self.db.session() as session:
            found = Repositories(session).job(tenant_id, job_id)
        if found is None:
            raise NotFound("job not found")
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            ledger = Ledger(repos)
            budget = ledger.lock(found.dataset_id)  # lock order: budget row, then job row
            job = repos.job_by_id(job_id, lock=True)
            assert job is not None
            if JobStatus(job.status).terminal:
                raise JobNotCancellable(f"job is already {job.status}", job_status=job.status)
            job.cancel_requested = True
            job.updated_at = utcnow()
            if job.status == JobStatus.QUEUED:
                job.status = JobStatus.CANCELLED
                job.finished_at = utcnow()
                # A job re-queued after a lost worker has touched the data already.
                steps = steps_to_charge(job, report_every=self.settings.worker.report_every_steps)
                if budget is not None:
                    ledger.settle(budget, job.id, steps=steps, note="cancelled while queued")
                if steps and job.privacy is not None:
                    job.privacy = acc.final_privacy(job.privacy, steps, None)
        if job.status == JobStatus.CANCELLED:
            JobCheckpoints(ArtifactStore(self.settings.data_dir), job.id).clear()
        return job
