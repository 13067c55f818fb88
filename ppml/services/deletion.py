"""Deleting a dataset: its data and what holds data go; its accounting stays.

``DELETE /v1/datasets/{id}`` (owners) erases the files that hold the dataset's rows (its
arrays, an upload still being validated) and its jobs' checkpoints, and, when the owner asks
(``delete_models``), its jobs' model files. It keeps the dataset's row (marked deleted: no
longer listed, and 404 wherever it is named), its budget row, its ledger entries, its jobs'
records and the audit trail, so the rows' fingerprint still refuses a new budget on the same
data (:mod:`ppml.services.fingerprints`): deleting cannot refund spent ε.

It runs in the request's unit of work under the tenant row's lock, which admission takes
first too, so no job is admitted on the dataset while it is being deleted, and a job admitted
before is seen (queued or running jobs make it a 409). The files are deleted before the
transaction commits: if the commit fails, the dataset stays listed without its files (jobs on
it fail), and the owner deletes it again; the reverse order could leave data behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ppml.db.models import Dataset, DatasetStatus, Job, JobStatus, utcnow
from ppml.db.repositories import Repositories
from ppml.errors import DatasetInUse, NotFound
from ppml.jobs.checkpoints import JobCheckpoints
from ppml.services import audit
from ppml.services.tenants import Principal, require_owner
from ppml.services.uploads import raw_upload_key
from ppml.storage import ArtifactStore

__all__ = ["Deletion", "delete_dataset"]

OWNER_ONLY = "only an owner key may delete the tenant's datasets"
_SHOWN = 10  # ids named in a refusal


@dataclass(frozen=True, kw_only=True)
class Deletion:
    """What a deletion did (``changed`` False: a repeated deletion with nothing left to do)."""

    dataset_id: str
    changed: bool
    jobs: int
    models_deleted: int


def delete_dataset(
    repos: Repositories,
    store: ArtifactStore,
    *,
    tenant_id: str,
    dataset_id: str,
    delete_models: bool = False,
    by: Principal | None = None,
) -> Deletion:
    """Delete one of the tenant's datasets (see the module).

    Deleting a deleted dataset again deletes what is left: its models, when asked now.

    Args:
        delete_models: Also delete the model files of the dataset's jobs (their digests and
            receipts stay on the jobs; downloads and predictions then answer 410).
        by: Who deletes it; an owner of the tenant (None: the admin).

    Raises:
        NotFound: the tenant has no such dataset (checked first, so another tenant's ids look
            missing to every role).
        Forbidden: ``by`` is an analyst's key.
        DatasetInUse: queued or running jobs use it, or another dataset validates on it.
    """
    if repos.dataset(tenant_id, dataset_id) is None:
        raise NotFound("dataset not found")
    if by is not None:
        require_owner(by, OWNER_ONLY)
    repos.lock_tenant(tenant_id)  # admissions of the tenant wait (lock order: tenant first)
    dataset = repos.lock_dataset(dataset_id)
    assert dataset is not None
    jobs = repos.dataset_jobs(dataset_id)
    first = dataset.deleted_at is None
    if first:
        _refuse_in_use(repos, dataset, jobs)
    models = [j for j in jobs if delete_models and j.models_deleted_at is None and j.artifacts]
    _delete_files(store, dataset, jobs, models)
    if not first and not models:
        return Deletion(dataset_id=dataset_id, changed=False, jobs=len(jobs), models_deleted=0)
    now = utcnow()
    if first:
        _mark_deleted(dataset, now)
    for job in models:
        job.models_deleted_at = now
    detail = {"delete_models": delete_models, "jobs": len(jobs), "models_deleted": len(models)}
    audit.record(repos, by, "dataset.delete", "dataset", dataset_id, detail, tenant_id=tenant_id)
    return Deletion(dataset_id=dataset_id, changed=True, jobs=len(jobs), models_deleted=len(models))


def _refuse_in_use(repos: Repositories, dataset: Dataset, jobs: Sequence[Job]) -> None:
    if dataset.federation_backing:
        raise DatasetInUse(
            "this dataset backs a federation (its jobs, budget and ledger): it is not deleted "
            "on its own"
        )
    active = [j.id for j in jobs if j.status in (JobStatus.QUEUED, JobStatus.RUNNING)]
    if active:
        raise DatasetInUse(
            f"dataset {dataset.id} has {len(active)} queued or running job(s); cancel them "
            "or wait until they end, then delete it",
            active_jobs=active[:_SHOWN],
        )
    validated = repos.datasets_validated_by(dataset.id, limit=_SHOWN)
    if validated:
        raise DatasetInUse(
            f"dataset {dataset.id} is the validation set of dataset(s) {', '.join(validated)}; "
            "delete those first",
            validation_for=validated,
        )


def _mark_deleted(dataset: Dataset, now: datetime) -> None:
    dataset.deleted_at = now
    dataset.stored_bytes = 0  # frees the tenant's storage quota
    if dataset.status == DatasetStatus.VALIDATING:
        # Its ingestion, running or not, finds it no longer validating and keeps nothing.
        dataset.status = DatasetStatus.INVALID
        dataset.problem = {
            "code": "dataset-deleted",
            "title": "Dataset deleted",
            "detail": "the dataset was deleted while its upload was being validated",
        }
        dataset.ingest = None


def _delete_files(
    store: ArtifactStore, dataset: Dataset, jobs: Sequence[Job], models: Sequence[Job]
) -> None:
    """Delete every file that holds the dataset's rows or was trained on them (models only
    for ``models``). Deleting a missing file is no error, so this may run again."""
    store.delete(dataset.storage_key)
    if "upload" in dataset.source:
        store.delete(raw_upload_key(dataset))
    for job in jobs:
        JobCheckpoints(store, job.id).clear()
    for job in models:
        assert job.artifacts is not None
        keys = {ref.key for ref in job.artifacts.root.values()}
        # Files of earlier attempts too (models/<job>.attempt-<n>.<format>).
        keys |= set(store.list("models", f"{job.id}."))
        for key in sorted(keys):
            store.delete(key)
