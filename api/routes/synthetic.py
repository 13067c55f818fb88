"""DP synthetic tables of synthesize jobs: the rows, and their quality report by role.

Every key of the tenant may download the synthetic rows (a DP release, charged on the
ledger) and read the report's ``synthetic`` part (computed on those rows alone). The
``private`` part compares them with the private rows (marginal distances, train-synthetic-
test-real accuracy): exact statistics of protected data, for the dataset's owner only
(PRIVACY.md, "Roles"; docs/privacy.md).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.deps import CurrentPrincipal, OwnedJob, StoreDep
from api.downloads import serve_artifact
from api.routes.common import Router, errors
from ppml.db.models import Job, JobStatus
from ppml.db.reads import AsyncReads
from ppml.errors import Conflict, Gone
from ppml.jobs.synthesis import REPORT, SYNTHETIC
from ppml.services import audit
from ppml.storage import ArtifactStore

router = Router(prefix="/v1/jobs", tags=["synthetic"])


class SyntheticNotReady(Conflict):
    code = "synthetic-not-ready"
    title = "Synthetic data not available"


class SyntheticDeleted(Gone):
    code = "synthetic-deleted"
    title = "Synthetic data deleted"


def _artifact(job: Job, name: str) -> tuple[str, str]:
    """Store key and sha256 of a succeeded synthesize job's artefact; 409 otherwise."""
    if job.spec.kind != "synthesize":
        raise SyntheticNotReady("this job is not a synthesize job", job_kind=job.spec.kind)
    if job.status != JobStatus.SUCCEEDED:
        raise SyntheticNotReady(f"the job is {job.status}; synthetic data exists once it succeeded")
    ref = job.artifacts.get(name) if job.artifacts is not None else None
    if ref is None:
        raise SyntheticNotReady(f"this job has no {name} artefact")
    if job.models_deleted_at is not None:
        raise SyntheticDeleted(
            "this job's files were deleted with its dataset (delete_models)",
            models_deleted_at=job.models_deleted_at.isoformat(),
        )
    return ref.key, ref.sha256


@router.get(
    "/{job_id}/synthetic",
    operation_id="download_synthetic",
    responses={
        **errors(404, 409, 410),
        200: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "The synthetic rows as CSV: one column per synthesized feature, "
            "then `label` (the declared class names). `X-Content-SHA256` gives the digest "
            "the signed receipt (`/v1/jobs/{id}/receipt`) binds.",
        },
    },
)
async def download_synthetic(
    job: OwnedJob, store: StoreDep, request: Request, principal: CurrentPrincipal
) -> Response:
    """Download a synthesize job's DP synthetic table (CSV). Recorded in the audit trail."""
    key, digest = _artifact(job, SYNTHETIC)
    reads: AsyncReads = request.app.state.reads
    await audit.record_async(reads, principal, "model.download", "job", job.id, {"format": "csv"})
    response = await serve_artifact(
        store, key, digest, f"{job.id}.csv", request.headers.get("range")
    )
    response.headers["Content-Type"] = "text/csv; charset=utf-8"
    return response


def _read_json(store: ArtifactStore, key: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(b"".join(store.read_range(key)))
    return data


@router.get(
    "/{job_id}/synthetic/report",
    operation_id="get_synthetic_report",
    responses=errors(404, 409, 410),
)
async def get_synthetic_report(
    job: OwnedJob, store: StoreDep, principal: CurrentPrincipal
) -> dict[str, Any]:
    """The synthetic table's quality report: ``synthetic`` (on the synthetic rows alone:
    rows, coverage of each column's declared cells, the bounds used) for every key;
    ``private`` (total-variation distance of the 1- and 2-way marginals to the training
    rows, train-synthetic-test-real accuracy) for owner keys only."""
    key, _digest = _artifact(job, REPORT)
    report = await run_in_threadpool(_read_json, store, key)
    shown: dict[str, Any] = {"job_id": job.id, "synthetic": report["synthetic"]}
    if principal.is_owner:
        shown["private"] = report["private"]
    return shown
