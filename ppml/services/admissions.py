"""What an admission decides on and writes: the priced request, the job row it becomes,
the idempotency check of a replay, and the submit's audit event
(:class:`ppml.services.jobs.JobService` decides; these are its pieces)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ppml.db.models import AuditEvent, Dataset, Job, new_id, utcnow
from ppml.db.repositories import Repositories
from ppml.errors import DatasetDeleted, IdempotencyMismatch
from ppml.jobs import lifecycle
from ppml.jobs.records import Progress
from ppml.services import audit
from ppml.services.pricing import Pricing
from ppml.services.tenants import Principal
from ppml.specs import JobSpec

__all__ = [
    "Admission",
    "check_same_request",
    "new_job",
    "new_job_columns",
    "record_submit",
    "refuse_if_deleted",
    "submit_event",
]


@dataclass(frozen=True, kw_only=True)
class Admission:
    """A priced job waiting for its admission decision."""

    tenant_id: str
    dataset: Dataset
    spec: JobSpec
    pricing: Pricing
    by: Principal | None = None  # who submits it, for the audit trail (None: the admin)


def new_job(admission: Admission, digest: str, idempotency_key: str | None) -> Job:
    """The queued job row an admitted request becomes (not yet added to the session)."""
    return Job(**new_job_columns(admission, digest, idempotency_key))


def new_job_columns(
    admission: Admission, digest: str, idempotency_key: str | None
) -> dict[str, Any]:
    """The columns of :func:`new_job`'s row, for a bulk insert of a batch's jobs."""
    spec = admission.spec
    # A federated job reports rounds from 0, as its worker will.
    progress = Progress(fraction=0.0, epoch=0, round=None if spec.federated is None else 0, steps=0)
    return lifecycle.new_job_columns(
        id=new_id("job"),
        tenant_id=admission.tenant_id,
        dataset_id=admission.dataset.id,
        name=spec.name,
        spec=spec,
        progress=progress,
        metrics=None,
        privacy=admission.pricing.privacy_plan(spec),
        error=None,
        idempotency_key=idempotency_key,
        request_hash=digest,
        compute=admission.pricing.compute,
        # Marked sent now, saving a write after the send; a failed send clears it.
        enqueued_at=utcnow(),
    )


def check_same_request(job: Job, digest: str) -> None:
    """Refuse (422) a replay whose body differs from the request its key first came with."""
    if job.request_hash != digest:
        raise IdempotencyMismatch(
            "this Idempotency-Key was used with another request body", field="Idempotency-Key"
        )


def record_submit(repos: Repositories, admission: Admission, job: Job) -> None:
    """The created job's audit event, staged with it (replays are not recorded)."""
    repos.stage(AuditEvent(**submit_event(admission, job)))


def submit_event(admission: Admission, job: Job) -> dict[str, Any]:
    """The columns of the created job's audit event (``job.submit``), for
    :func:`record_submit` or a batch's bulk insert."""
    privacy = admission.spec.privacy
    detail = {
        "dataset_id": job.dataset_id,
        "target_epsilon": privacy.target_epsilon if privacy is not None else None,
    }
    return audit.fields_of(
        admission.by, "job.submit", "job", job.id, detail, tenant_id=admission.tenant_id
    )


def refuse_if_deleted(repos: Repositories, dataset_id: str, deleted: bool | None) -> None:
    """Under the tenant's lock, which a deletion holds too: the cached dataset may have
    been deleted since it was read. ``deleted``: what the budget's lock read under that
    lock already (None: ask)."""
    if deleted is None:
        deleted = repos.dataset_deleted(dataset_id)
    if deleted:
        raise DatasetDeleted(
            f"dataset {dataset_id} was deleted; its ledger, budget and audit trail are kept",
            field="dataset_id",
        )
