"""Jobs: admit (reserve budget), enqueue, quote, cancel.

Admission keeps σ calibration outside the lock: the dataset is read (once; it is cached) and
the job priced without a transaction, then a writer transaction locks the tenant's row and
the budget row (in that order, everywhere), counts the tenant's active jobs and re-checks the
filter on the newest totals, and inserts the job and its RESERVE entry together.
Concurrent admissions to one dataset are grouped (:mod:`ppml.services.grouping`): one
transaction, one pair of locks and one commit decide a batch of them, in arrival order, each
on the totals and counts that include the ones before it, exactly as if they had come one
after the other. The tenant's lock makes its active-job limit exact across API processes,
and its compute limit too: under the lock, the compute estimates of its queued and running
jobs are summed, and each admission of a batch adds its own before the next is decided.

Quotes are cached per tenant, job shape (the spec without its name) and the version of the
dataset's budget row, which every ledger write bumps: a repeated quote costs one read of
that version, and is priced again only after the budget changed.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy.exc import IntegrityError

from ppml.cache import LRUCache
from ppml.config import Settings
from ppml.db.base import detached
from ppml.db.models import Dataset, DatasetBudget, DatasetStatus, Job, JobStatus, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import (
    BudgetExceeded,
    DatasetDeleted,
    InvalidInput,
    JobNotCancellable,
    LedgerHeadsInvalid,
    LedgerRollback,
    NotFound,
    PPMLError,
)
from ppml.jobs import lifecycle
from ppml.jobs.checkpoints import JobCheckpoints
from ppml.jobs.schedule import steps_to_charge
from ppml.privacy import heads
from ppml.privacy.ledger import Ledger
from ppml.queue import enqueue_job
from ppml.services import audit
from ppml.services.admissions import (
    Admission,
    check_same_request,
    new_job,
    new_job_columns,
    record_submit,
    refuse_if_deleted,
    submit_event,
)
from ppml.services.datasets import require_live
from ppml.services.defaults import with_defaults
from ppml.services.federation_jobs import federation_target
from ppml.services.grouping import GroupCommit, Pending
from ppml.services.hints import largest_target
from ppml.services.pate import check_student
from ppml.services.pricing import Pricing, price
from ppml.services.quotes import Quote, Quotes
from ppml.services.rooms import TenantRooms, demands_of
from ppml.services.statistics import require_statistics
from ppml.services.tenants import Principal
from ppml.specs import JobSpec, request_hash
from ppml.storage import ArtifactStore

__all__ = ["JobService", "Quote"]

log = logging.getLogger(__name__)

# At most this many admissions share one transaction (the rest wait for the next one).
ADMISSION_BATCH = 64


@dataclass(frozen=True)
class _Refused:
    """A batch's 409 for a job that does not fit, with the budget row as the batch committed
    it: the refusal's hint (``max_target_epsilon``) is computed on that row, not read again."""

    error: BudgetExceeded
    budget: DatasetBudget


_Queued = Pending[tuple[Admission, str], Job | _Refused]


class JobService:
    """Use cases on jobs. It owns its transactions, to keep calibration outside the lock."""

    def __init__(self, db: Database, settings: Settings, celery: Celery) -> None:
        self.db, self.settings, self.celery = db, settings, celery
        self.store = ArtifactStore.for_settings(settings)
        heads.attach(db, settings)  # ledger appends move the signed chain heads
        # Datasets never change after registration, so admission need not re-read them.
        self._datasets: LRUCache[tuple[str, str], Dataset] = LRUCache(10_000)
        self.rooms = TenantRooms(db, settings)
        self.quotes = Quotes(db, settings)
        # Concurrent admissions to one dataset share one budget lock and one commit.
        self._admissions: GroupCommit[tuple[Admission, str], Job | _Refused] = GroupCommit(
            self._admit_batch, max_batch=ADMISSION_BATCH
        )

    def _dataset(self, repos: Repositories, tenant_id: str, dataset_id: str) -> Dataset:
        dataset = self._datasets.get((tenant_id, dataset_id))
        if dataset is None:
            dataset = repos.dataset(tenant_id, dataset_id)
            if dataset is None:
                raise NotFound("dataset not found", field="dataset_id")
            require_live(dataset)
            if dataset.status == DatasetStatus.READY:  # a validating one will change
                self._datasets.put((tenant_id, dataset_id), dataset)
        return dataset

    def _cached_dataset(self, tenant_id: str, dataset_id: str) -> Dataset:
        dataset = self._datasets.get((tenant_id, dataset_id))
        if dataset is None:  # a session (and a pooled connection) only on a cache miss
            with self.db.read_one() as session:
                dataset = self._dataset(Repositories(session), tenant_id, dataset_id)
        return dataset

    def _target(self, tenant_id: str, spec: JobSpec) -> tuple[Dataset, JobSpec]:
        """The dataset a job is priced on, and its spec (a federation's job: its backing
        dataset, read afresh as its nodes change; ppml.services.federation_jobs)."""
        if spec.federation_id is None:
            assert spec.dataset_id is not None  # JobSpec requires one of the two
            return self._cached_dataset(tenant_id, spec.dataset_id), spec
        with self.db.read_one() as session:
            return federation_target(Repositories(session), tenant_id, spec)

    def _priced(self, tenant_id: str, spec: JobSpec) -> tuple[Dataset, JobSpec, Pricing]:
        """The dataset, the spec with its defaults filled in (ppml.defaults), its price."""
        dataset, spec = self._target(tenant_id, spec)
        spec = with_defaults(spec, dataset, self.settings.limits)
        pricing = price(spec, dataset, self.settings)
        self._check_student(tenant_id, spec, dataset)
        return dataset, spec, pricing

    def _check_student(self, tenant_id: str, spec: JobSpec, dataset: Dataset) -> None:
        """A pate job's student reads a public dataset of the tenant (422 otherwise)."""
        student = spec.pate.student if spec.pate is not None else None
        if student is None:
            return
        try:
            public = self._cached_dataset(tenant_id, student.public_dataset_id)
        except NotFound:
            raise InvalidInput(
                "the student's dataset does not exist",
                field="pate.student.public_dataset_id",
            ) from None
        check_student(spec, dataset, public)

    def quote(self, tenant_id: str, spec: JobSpec) -> Quote:
        """Price a job and say whether it fits its dataset's budget now (ppml.services.quotes)."""
        dataset, spec = self._target(tenant_id, spec)
        spec = with_defaults(spec, dataset, self.settings.limits)
        self._check_student(tenant_id, spec, dataset)
        return self.quotes.quote(tenant_id, dataset, spec)

    def _largest_fitting(
        self, dataset: Dataset, spec: JobSpec, pricing: Pricing, budget: DatasetBudget | None
    ) -> float | None:
        """After a refusal, outside any lock: the largest target ε of this shape that fits
        ``budget`` (None: the budget row as it is now)."""
        if pricing.event is None:
            return None
        if budget is None:
            with self.db.read_one() as session:
                budget = Repositories(session).budget(dataset.id)
        assert budget is not None
        return largest_target(spec, dataset, budget, pricing, self.settings)

    def submit(
        self,
        tenant_id: str,
        spec: JobSpec,
        *,
        idempotency_key: str | None = None,
        by: Principal | None = None,
    ) -> tuple[Job, bool]:
        """Admit and enqueue a job. Returns ``(job, created)``; replays return ``created=False``.

        A created job's audit event (``job.submit``, by ``by``; None: the admin) commits with
        it; a replay records nothing."""
        if idempotency_key is None:  # a replay is answered even at the limit
            self.rooms.refuse_if_full(self.rooms.early(tenant_id))
        # The digest is of the request as sent: a replay of it matches, defaults or not.
        digest = request_hash(spec)
        dataset, spec, pricing = self._priced(tenant_id, spec)
        if spec.preprocessing.standardize:  # read afresh: the cached row may predate them
            require_statistics(self.db, dataset.id)
        admission = Admission(
            tenant_id=tenant_id, dataset=dataset, spec=spec, pricing=pricing, by=by
        )
        after: DatasetBudget | None = None  # the budget as the batch that refused it left it
        try:
            if idempotency_key is None and pricing.event is not None:
                outcome = self._admissions.submit(dataset.id, (admission, digest))
                if isinstance(outcome, _Refused):
                    after = outcome.budget
                    raise outcome.error
                job, created = outcome, True
            else:
                job, created = self._admit(admission, digest, idempotency_key)
        except BudgetExceeded as refusal:
            hint = self._largest_fitting(dataset, spec, pricing, after)
            refusal.extra["max_target_epsilon"] = hint
            raise
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the insert.
            assert idempotency_key is not None
            job, created = self._replay(tenant_id, idempotency_key, digest), False
        if created:
            self.enqueue(job.id)
        return job, created

    def _replay(self, tenant_id: str, key: str, digest: str) -> Job:
        with self.db.read_one() as session:
            job = Repositories(session).job_by_idempotency_key(tenant_id, key)
        assert job is not None
        check_same_request(job, digest)
        return job

    def _admit(
        self, admission: Admission, digest: str, idempotency_key: str | None
    ) -> tuple[Job, bool]:
        """Admit one job in its own transaction (replays, non-private jobs, fallbacks)."""
        tenant_id, dataset, pricing = admission.tenant_id, admission.dataset, admission.pricing
        # One transaction and one pooled connection for the whole admission.
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            ledger = Ledger(repos)
            # Lock first (tenant, then budget): a duplicate with the same key is then
            # serialised behind us, and so is every other admission of the tenant.
            demand = {tenant_id: (1, pricing.compute)}
            room = self.rooms.locked(repos, demand)[tenant_id]
            budget, deleted = None, None
            if pricing.event is not None:
                budget, deleted = repos.lock_budget_of_live(dataset.id)
            if idempotency_key is not None:
                existing = repos.job_by_idempotency_key(tenant_id, idempotency_key)
                if existing is not None:
                    check_same_request(existing, digest)
                    return existing, False
            if budget is not None:
                ledger.require_current(dataset.id)  # 409 on a rolled-back ledger
            refuse_if_deleted(repos, dataset.id, deleted)
            self.rooms.refuse_if_no_room(room, pricing.compute)  # only for a new job, not a replay
            job = new_job(admission, digest, idempotency_key)
            # Staged, not flushed: the commit writes the job, its entry and the totals in one
            # flush, while the lock is held for as short a time as possible.
            repos.stage(job)
            record_submit(repos, admission, job)
            if budget is not None and pricing.event is not None:
                ledger.reserve(budget, job, pricing.event)
        self.rooms.admitted(tenant_id)
        return job, True

    def _admit_batch(self, dataset_id: Hashable, batch: Sequence[_Queued]) -> None:
        """Decide a batch of admissions to one dataset (see :mod:`ppml.services.grouping`);
        a batch of one too: its bulk inserts, sent together, cost less than a flush of rows."""
        try:
            decided, budget = self._decide(str(dataset_id), [p.item for p in batch])
        except Exception:
            log.exception("grouped admission failed; deciding the batch one by one")
        else:
            for pending, outcome in zip(batch, decided, strict=True):
                if isinstance(outcome, Job):
                    pending.resolve(outcome)
                elif isinstance(outcome, BudgetExceeded) and budget is not None:
                    pending.resolve(_Refused(outcome, budget))
                else:
                    pending.fail(outcome)
            return
        for pending in batch:  # alone, in arrival order: the same decisions, one lock each
            admission, digest = pending.item
            try:
                pending.resolve(self._admit(admission, digest, None)[0])
            except Exception as exc:
                pending.fail(exc)

    def _decide(
        self, dataset_id: str, items: Sequence[tuple[Admission, str]]
    ) -> tuple[list[Job | PPMLError], DatasetBudget | None]:
        """One transaction under the tenant's lock and one budget lock: each item is decided
        on the totals and job counts that include the items before it (a serial replay in
        arrival order), then all are written in one flush. Raises, writing nothing, if the
        transaction fails. Returns the decisions and the budget row as committed."""
        decided: list[Job | PPMLError] = []
        events: list[dict[str, Any]] = []  # the admitted jobs' audit events, inserted at once
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            ledger = Ledger(repos, bulk=True)  # the entries too, after their jobs
            # A dataset has one tenant, so this is one more lock per batch, not per item.
            room = self.rooms.locked(repos, demands_of(a for a, _ in items))
            budget, deleted = repos.lock_budget_of_live(dataset_id)
            if budget is not None:
                try:
                    ledger.require_current(dataset_id)
                except (LedgerRollback, LedgerHeadsInvalid) as refusal:  # nothing written
                    return [type(refusal)(refusal.detail, **refusal.extra) for _ in items], None
            try:
                refuse_if_deleted(repos, dataset_id, deleted)
            except DatasetDeleted as refusal:  # nothing written
                return [DatasetDeleted(refusal.detail, **refusal.extra) for _ in items], None
            rows: list[dict[str, Any]] = []  # the admitted jobs, inserted at once
            for admission, digest in items:
                row = new_job_columns(admission, digest, None)
                job = detached(Job, row)  # the answer's; the row is inserted from ``row``
                try:
                    self.rooms.refuse_if_no_room(
                        room[admission.tenant_id], admission.pricing.compute
                    )
                    if budget is not None and admission.pricing.event is not None:
                        ledger.reserve(budget, job, admission.pricing.event)
                except PPMLError as refusal:  # raised before anything is reserved
                    decided.append(refusal)
                    continue
                rows.append(row)
                events.append(submit_event(admission, job))
                room[admission.tenant_id].admit(admission.pricing.compute)
                decided.append(job)
            with repos.pipelined():  # three statements, one round trip
                repos.insert_jobs(rows)  # before their ledger entries, which refer to them
                ledger.write()
                repos.insert_audit_events(events)
        for outcome in decided:
            if isinstance(outcome, Job):
                self.rooms.admitted(outcome.tenant_id)
        return decided, budget

    def enqueue(self, job_id: str) -> None:
        """Send the job; if the broker is down, leave it to the reaper, which re-sends it."""
        if not enqueue_job(self.celery, job_id):
            with self.db.session(write=True) as session:
                Repositories(session).mark_enqueued(job_id, sent=False)

    def cancel(self, tenant_id: str, job_id: str) -> Job:
        """:meth:`cancel_in` a transaction of its own, then :meth:`forget` (in-process use)."""
        with self.db.session(write=True) as session:
            job = self.cancel_in(Repositories(session), tenant_id, job_id)
        if job.status == JobStatus.CANCELLED:
            self.forget(job.id)
        return job

    def cancel_in(
        self, repos: Repositories, tenant_id: str, job_id: str, *, by: Principal | None = None
    ) -> Job:
        """Queued → cancelled with a full release; running → asks the worker to stop.

        Runs in the caller's unit of work (a writer transaction), which commits it with its
        audit event (``job.cancel``, by ``by``; None: the admin); a job cancelled here then
        has checkpoints to :meth:`forget`, after the commit.
        """
        found = repos.job(tenant_id, job_id)
        if found is None:
            raise NotFound("job not found")
        Ledger(repos).lock(found.dataset_id)  # lock order: budget row, then job row
        job = repos.job_by_id(job_id, lock=True)
        assert job is not None
        if JobStatus(job.status).terminal:
            raise JobNotCancellable(f"job is already {job.status}", job_status=job.status)
        job.cancel_requested = True
        job.updated_at = utcnow()
        if job.status == JobStatus.QUEUED:
            # A job re-queued after a lost worker has touched the data already.
            steps = steps_to_charge(job, report_every=self.settings.worker.report_every_steps)
            ending = lifecycle.Ending(
                status=JobStatus.CANCELLED, steps=steps, note="cancelled while queued"
            )
            lifecycle.finish(repos, job, ending)
        detail = {"dataset_id": job.dataset_id, "status": job.status}
        audit.record(repos, by, "job.cancel", "job", job.id, detail, tenant_id=tenant_id)
        return job

    def forget(self, job_id: str) -> None:
        """Delete a finished job's checkpoints (after the transaction that finished it)."""
        JobCheckpoints(self.store, job_id).clear()

    def forget_dataset(self, tenant_id: str, dataset_id: str) -> None:
        """Drop a deleted dataset from this process's cache (admission re-checks it under the
        tenant's lock in every process anyway: ``admissions.refuse_if_deleted``)."""
        self._datasets.pop((tenant_id, dataset_id))
