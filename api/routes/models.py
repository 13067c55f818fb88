"""Trained models: download with the privacy receipt, and the model card."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import OwnedJob, StoreDep
from api.routes.common import errors
from api.schemas import ModelCard
from ppml.db.models import Job, JobStatus
from ppml.errors import Conflict, InvalidInput
from ppml.storage import ArtifactStore

router = APIRouter(prefix="/v1/jobs", tags=["models"])

_MAX_HEADER = 16 * 1024 * 1024


class ModelNotReady(Conflict):
    code = "model-not-ready"
    title = "Model not available"


def _artifact(job: Job, store: ArtifactStore, fmt: str = "safetensors") -> Path:
    artifacts = job.artifacts or {}
    if job.status != JobStatus.SUCCEEDED or fmt not in artifacts:
        raise ModelNotReady(f"the job is {job.status}; models exist for succeeded jobs")
    return store.path(artifacts[fmt]["key"])


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its JSON header (no torch)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > _MAX_HEADER:
            raise ValueError("safetensors header too large")
        header = json.loads(handle.read(length))
    metadata = header.get("__metadata__", {})
    return {str(k): str(v) for k, v in metadata.items()}


@router.get(
    "/{job_id}/model",
    operation_id="download_model",
    responses={
        **errors(404, 409),
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "The model as safetensors; __metadata__ holds the privacy receipt.",
        },
    },
    response_class=FileResponse,
)
def download_model(
    job: OwnedJob, store: StoreDep, format: Literal["safetensors", "onnx"] = "safetensors"
) -> FileResponse:
    """Download the trained model (safetensors, privacy receipt in its metadata)."""
    if format == "onnx":
        raise InvalidInput("ONNX export is not available on this server yet", field="format")
    path = _artifact(job, store)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{job.id}.safetensors",
        headers={"X-Content-SHA256": (job.artifacts or {})["safetensors"]["sha256"]},
    )


@router.get(
    "/{job_id}/model/card",
    operation_id="get_model_card",
    responses=errors(404, 409),
    response_model=ModelCard,
)
def get_model_card(job: OwnedJob, store: StoreDep) -> ModelCard:
    """The privacy receipt and held-out metrics of a trained model."""
    path = _artifact(job, store)
    return ModelCard(
        job_id=job.id,
        dataset_id=job.dataset_id,
        receipt=read_safetensors_metadata(path),
        metrics=job.metrics,
        artifacts={fmt: {"sha256": a["sha256"]} for fmt, a in (job.artifacts or {}).items()},
    )
