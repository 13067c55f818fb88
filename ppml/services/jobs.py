"""Jobs: price, admit (reserve budget), enqueue, cancel.

Admission keeps σ calibration outside the lock: the dataset is read and the job priced in a
short read transaction, then a writer transaction locks the budget row, re-checks the filter
on the newest totals, and inserts the job and its RESERVE entry together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy.exc import IntegrityError

from ppml.config import Settings
from ppml.db.models import Dataset, Job, JobStatus, new_id, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import (
    IdempotencyMismatch,
    InvalidInput,
    JobNotCancellable,
    NotFound,
    PrivacyRequired,
    TooManyRequests,
)
from ppml.privacy import accounting as acc
from ppml.privacy.ledger import Ledger, budget_status
from ppml.queue import enqueue_job
from ppml.specs import JobSpec, count_parameters, request_hash

__all__ = ["JobService", "Pricing", "Quote", "price"]


@dataclass(frozen=True, kw_only=True)
class Pricing:
    """What a job will cost, computed before it runs."""

    event: acc.MechanismEvent | None  # None for non-private jobs
    epsilon: float  # the job's own ε at its δ (0 when non-private)
    delta: float | None
    steps_per_epoch: int
    total_steps: int

    def privacy_plan(self, spec: JobSpec) -> dict[str, Any] | None:
        if self.event is None or spec.privacy is None:
            return None
        return {
            "target_epsilon": spec.privacy.target_epsilon,
            "epsilon_planned": self.epsilon,
            "epsilon_spent": None,
            "delta": self.delta,
            "noise_multiplier": self.event.noise_multiplier,
            "max_grad_norm": spec.privacy.max_grad_norm,
            "sample_rate": self.event.sample_rate,
            "sampling": self.event.sampling,
            "steps": 0,
            "steps_planned": self.event.steps,
            "unit": self.event.unit,
            "accountant": "rdp",
            "grid_version": acc.GRID_VERSION,
        }


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


def _validate_against(spec: JobSpec, dataset: Dataset, settings: Settings) -> None:
    limits = settings.limits
    if spec.federated is not None:
        raise InvalidInput("federated jobs are not available on this server yet", field="federated")
    if spec.training.batch_size > dataset.num_train:
        raise InvalidInput(
            f"batch_size exceeds the dataset's {dataset.num_train} training records",
            field="training.batch_size",
        )
    if spec.training.epochs > limits.max_epochs:
        raise InvalidInput(
            f"at most {limits.max_epochs} epochs", field="training.epochs", limit=limits.max_epochs
        )
    if spec.training.epochs * dataset.num_train > limits.max_sample_epochs:
        raise InvalidInput(
            "epochs × training records exceeds this server's limit",
            field="training.epochs",
            limit=limits.max_sample_epochs,
        )
    params = count_parameters(
        spec.model, num_features=dataset.num_features, num_classes=dataset.num_classes
    )
    if params > limits.max_parameters:
        raise InvalidInput(
            f"the model has {params} parameters; the limit is {limits.max_parameters}",
            field="model",
            limit=limits.max_parameters,
        )
    privacy = spec.privacy
    if privacy is None:
        if dataset.epsilon_total is not None:
            raise PrivacyRequired(
                "this dataset has a privacy budget: jobs on it must set 'privacy'"
            )
        return
    if privacy.sampling != "poisson":
        raise InvalidInput(
            "only Poisson sampling is certified by the accountant", field="privacy.sampling"
        )
    if privacy.level == "client":
        raise InvalidInput("client-level privacy applies to federated jobs", field="privacy.level")
    if dataset.privacy_unit == "client" and dataset.epsilon_total is not None:
        raise InvalidInput(
            "this dataset's budget protects whole clients; record-level jobs cannot spend it",
            field="privacy.level",
        )
    cap = dataset.delta_total
    if cap is not None and privacy.delta is not None and privacy.delta > cap:
        raise InvalidInput(
            f"delta may not exceed the dataset's delta ({cap:g})",
            field="privacy.delta",
        )
    if privacy.delta is not None and privacy.delta >= 1 / dataset.num_train:
        raise InvalidInput(
            f"delta must be well below 1/n = {1 / dataset.num_train:.3g}", field="privacy.delta"
        )


def _check_same_request(job: Job, digest: str) -> None:
    if job.request_hash != digest:
        raise IdempotencyMismatch(
            "this Idempotency-Key was used with another request body", field="Idempotency-Key"
        )


def price(spec: JobSpec, dataset: Dataset, settings: Settings) -> Pricing:
    """Validate a job against its dataset and compute its privacy cost (no writes)."""
    _validate_against(spec, dataset, settings)
    q, steps_per_epoch, total = acc.plan_dp_sgd(
        num_records=dataset.num_train,
        batch_size=spec.training.batch_size,
        epochs=spec.training.epochs,
    )
    if spec.privacy is None:
        return Pricing(
            event=None, epsilon=0.0, delta=None, steps_per_epoch=steps_per_epoch, total_steps=total
        )
    delta = spec.privacy.delta or dataset.delta_total or min(1e-5, 0.1 / dataset.num_train)
    try:
        sigma = acc.calibrate_noise(
            target_epsilon=spec.privacy.target_epsilon, delta=delta, sample_rate=q, steps=total
        )
    except ValueError as exc:
        raise InvalidInput(
            "no noise level reaches this target_epsilon for this job",
            field="privacy.target_epsilon",
        ) from exc
    event = acc.MechanismEvent(sample_rate=q, noise_multiplier=sigma, steps=total, unit="record")
    return Pricing(
        event=event,
        epsilon=acc.epsilon(acc.rdp_curve(event), delta),
        delta=delta,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
    )


class JobService:
    """Use cases on jobs. It owns its transactions, to keep calibration outside the lock."""

    def __init__(self, db: Database, settings: Settings, celery: Celery) -> None:
        self.db, self.settings, self.celery = db, settings, celery

    def _priced(self, tenant_id: str, spec: JobSpec) -> tuple[Dataset, Pricing]:
        with self.db.session() as session:
            dataset = Repositories(session).dataset(tenant_id, spec.dataset_id)
        if dataset is None:
            raise NotFound("dataset not found", field="dataset_id")
        return dataset, price(spec, dataset, self.settings)

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
                    refusal = ledger.refusal(
                        budget, pricing.event, requested=pricing.epsilon, delta=budget.delta_total
                    )
                    largest = refusal.extra["max_target_epsilon"]
        event = pricing.event
        return Quote(
            epsilon=pricing.epsilon,
            delta=pricing.delta,
            noise_multiplier=event.noise_multiplier if event else None,
            sample_rate=event.sample_rate if event else None,
            steps=pricing.total_steps,
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
        try:
            job, created = self._admit(tenant_id, dataset, spec, pricing, digest, idempotency_key)
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
            limit = self.settings.limits.max_active_jobs_per_tenant
            if repos.count_active_jobs(tenant_id) >= limit:
                raise TooManyRequests(
                    f"at most {limit} queued or running jobs per tenant; retry when some finish",
                    limit=limit,
                    retry_after=30,
                )
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
            )
            repos.add(job)
            if budget is not None and pricing.event is not None:
                ledger.reserve(budget, job, pricing.event)
        return job, True

    def enqueue(self, job_id: str) -> None:
        if enqueue_job(self.celery, job_id):
            with self.db.session(write=True) as session:
                Repositories(session).mark_enqueued(job_id)

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
                if budget is not None:
                    ledger.settle(budget, job.id, steps=None, note="cancelled before start")
        return job
