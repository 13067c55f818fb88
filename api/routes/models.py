"""Trained models: downloads with the privacy receipt, the model card, and predictions.

Predictions run onnxruntime in the API process (never torch), from the ONNX artefact the
worker exported; sessions are cached per ``(job id, sha256)``.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, Query, Request
from fastapi.responses import FileResponse, Response

from api.deps import (
    CurrentPrincipal,
    DatabaseDep,
    OwnedJob,
    SettingsDep,
    StoreDep,
    request_principal,
)
from api.downloads import serve_artifact
from api.routes.common import Router, errors
from api.routes.pate import answer_privately
from api.schemas import (
    ModelArchitecture,
    ModelCard,
    PredictRequest,
    PredictResponse,
    PrivatePredictResponse,
    ReceiptPrivacy,
)
from ppml.db.models import Job, JobStatus
from ppml.db.reads import AsyncReads
from ppml.errors import Conflict, Gone, InvalidInput
from ppml.inference import ModelCache
from ppml.jobs.receipts import file_metadata
from ppml.jobs.records import Receipt
from ppml.services import audit
from ppml.storage import ArtifactStore

router = Router(prefix="/v1/jobs", tags=["models"])

_MAX_HEADER = 16 * 1024 * 1024

Format = Literal["safetensors", "onnx"]
Unit = Literal["record", "client"]


class ModelNotReady(Conflict):
    code = "model-not-ready"
    title = "Model not available"


class ModelDeleted(Gone):
    code = "model-deleted"
    title = "Model deleted"


def _require_files(job: Job) -> None:
    """410 once the owner deleted the job's model files with its dataset."""
    if job.models_deleted_at is not None:
        raise ModelDeleted(
            "this job's model files were deleted with its dataset (delete_models); its "
            "receipt and digests stay on the model card",
            models_deleted_at=job.models_deleted_at.isoformat(),
        )


def _artifact(job: Job, fmt: str = "safetensors") -> tuple[str, str]:
    """Store key and sha256 of a succeeded job's artefact in ``fmt``; 409 otherwise."""
    pate = job.spec.pate
    if pate is not None and pate.student is None:
        raise ModelNotReady(
            "a pate job's teachers are private and never downloaded: ask for labels with "
            "POST /v1/jobs/{id}/predict (each answer is charged), or train a student",
            job_kind="pate",
        )
    if job.status != JobStatus.SUCCEEDED:
        raise ModelNotReady(f"the job is {job.status}; models exist for succeeded jobs")
    ref = job.artifacts.get(fmt) if job.artifacts is not None else None
    if ref is None:
        raise ModelNotReady(f"this job's model has no {fmt} artefact", format=fmt)
    return ref.key, ref.sha256


def read_safetensors_metadata(store: ArtifactStore, key: str) -> dict[str, str]:
    """The ``__metadata__`` of a stored safetensors file, read from its JSON header alone
    (two range reads; no torch)."""
    (length,) = struct.unpack("<Q", b"".join(store.read_range(key, 0, 7)))
    if length > _MAX_HEADER:
        raise ValueError("safetensors header too large")
    header = json.loads(b"".join(store.read_range(key, 8, 8 + length - 1)))
    metadata = header.get("__metadata__", {})
    return {str(k): str(v) for k, v in metadata.items()}


async def _model_cache(request: Request) -> ModelCache:
    """The app's model cache, made on first use (async: on the event loop, so no race and no
    thread-pool hop per prediction)."""
    state = request.app.state
    cache: ModelCache | None = getattr(state, "model_cache", None)
    if cache is None:
        size = state.settings.limits.model_cache_size
        cache = state.model_cache = ModelCache(capacity=size)
    return cache


ModelCacheDep = Annotated[ModelCache, Depends(_model_cache)]

_BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.get(
    "/{job_id}/model",
    operation_id="download_model",
    responses={
        **errors(404, 409, 410, 416),
        200: {
            "content": {"application/octet-stream": _BINARY},
            "description": "The model as safetensors (default) or ONNX (`format=onnx`); both "
            "carry the privacy receipt in their metadata. `X-Content-SHA256` gives the digest.",
        },
    },
    response_class=FileResponse,
)
async def download_model(
    job: OwnedJob,
    request: Request,
    format: Annotated[
        Format,
        Query(
            description="safetensors (weights; receipt in `__metadata__`) or onnx (graph "
            "with input `input` [batch, num_features] and output `logits`; receipt in "
            "`metadata_props`)."
        ),
    ] = "safetensors",
) -> Response:
    """Download the trained model with its privacy receipt (safetensors or ONNX).

    Each download is recorded in the audit trail before it is served; 410 once the owner
    deleted the model with its dataset. A single `Range` (`bytes=first-last`, `first-` or
    `-suffix`) answers 206 with those bytes; a range past the end answers 416."""
    key, digest = _artifact(job, format)
    _require_files(job)
    # The app's state and the principal OwnedJob resolved, not dependencies of their own:
    # fewer dependencies to solve on every download.
    state = request.app.state
    principal = request_principal(request)
    # On PostgreSQL an INSERT on the event loop (shared with concurrent downloads' rows,
    # committed before this returns), no thread or ORM session (ppml.db.reads).
    reads: AsyncReads = state.reads
    await audit.record_async(reads, principal, "model.download", "job", job.id, {"format": format})
    return await serve_artifact(
        state.store, key, digest, f"{job.id}.{format}", request.headers.get("range")
    )


def _number(receipt: dict[str, str], key: str) -> float:
    return float(receipt[key])


def _unit(receipt: dict[str, str]) -> Unit:
    return "client" if receipt.get("privacy_unit") == "client" else "record"


def _privacy(job: Job, receipt: dict[str, str], unit: Unit) -> ReceiptPrivacy | None:
    if receipt.get("private") != "true":
        return None
    return ReceiptPrivacy(
        epsilon=_number(receipt, "epsilon"),
        delta=_number(receipt, "delta"),
        accountant=receipt.get("accountant", "rdp"),
        privacy_unit=unit,
        noise_multiplier=_number(receipt, "noise_multiplier"),
        max_grad_norm=_number(receipt, "max_grad_norm"),
        sample_rate=_number(receipt, "sample_rate"),
        sampling=receipt.get("sampling", "poisson"),
        steps=int(receipt["steps"]),
        grid_version=receipt.get("grid_version"),
        ledger_entry_id=job.privacy.ledger_entry_id if job.privacy else None,
    )


def _json(receipt: dict[str, str], key: str, default: Any) -> Any:
    try:
        return json.loads(receipt[key])
    except (KeyError, json.JSONDecodeError):
        return default


@router.get(
    "/{job_id}/model/card",
    operation_id="get_model_card",
    responses=errors(404, 409, 410),
    response_model=ModelCard,
)
def get_model_card(job: OwnedJob, store: StoreDep) -> ModelCard:
    """The privacy receipt, released held-out metrics and artefact digests of a trained model."""
    key, _ = _artifact(job)
    files = job.artifacts.released() if job.artifacts is not None else {}
    digests = {fmt: {"sha256": ref.sha256} for fmt, ref in files.items()}
    if job.receipt is None:  # a model published before receipts were stored on the job
        _require_files(job)
        return _card_from_file(job, read_safetensors_metadata(store, key), digests)
    receipt, privacy = job.receipt, job.privacy
    return ModelCard(
        job_id=job.id,
        dataset_id=job.dataset_id,
        private=receipt.private,
        privacy=_receipt_privacy(receipt, privacy.ledger_entry_id if privacy else None),
        privacy_unit=receipt.privacy_unit,
        architecture=ModelArchitecture.model_validate(receipt.architecture),
        classes=receipt.classes,
        libraries=receipt.libraries,
        metrics=job.metrics,
        receipt=file_metadata(receipt),
        artifacts=digests,
    )


def _receipt_privacy(receipt: Receipt, ledger_entry_id: str | None) -> ReceiptPrivacy | None:
    privacy = receipt.privacy
    if privacy is None or privacy.epsilon_spent is None:
        return None
    return ReceiptPrivacy(
        epsilon=privacy.epsilon_spent,
        delta=privacy.delta,
        accountant=privacy.accountant,
        privacy_unit=privacy.unit,
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=privacy.sample_rate,
        sampling=privacy.sampling,
        steps=privacy.steps,
        grid_version=privacy.grid_version,
        ledger_entry_id=ledger_entry_id,
    )


def _card_from_file(
    job: Job, receipt: dict[str, str], digests: dict[str, dict[str, str]]
) -> ModelCard:
    unit = _unit(receipt)
    architecture = _json(receipt, "architecture", None)
    return ModelCard(
        job_id=job.id,
        dataset_id=job.dataset_id,
        private=receipt.get("private") == "true",
        privacy=_privacy(job, receipt, unit),
        privacy_unit=unit,
        architecture=ModelArchitecture(**architecture) if architecture else None,
        classes=[str(c) for c in _json(receipt, "classes", [])],
        libraries=_json(receipt, "libraries", {}),
        metrics=job.metrics,  # released, never an older file's exact figures
        receipt=receipt,
        artifacts=digests,
    )


def _matrix(inputs: list[list[float]], width: int) -> np.ndarray:
    for index, row in enumerate(inputs):
        if len(row) != width:
            raise InvalidInput(
                f"row {index} has {len(row)} values; the model takes {width} features",
                field=f"inputs.{index}",
            )
    matrix = np.asarray(inputs, dtype=np.float32)
    finite = np.isfinite(matrix)
    if not finite.all():
        # Finite as JSON numbers, but beyond float32's range.
        bad_row, bad_column = (int(i) for i in np.argwhere(~finite)[0])
        raise InvalidInput(
            f"inputs[{bad_row}][{bad_column}] is outside the float32 range",
            field=f"inputs.{bad_row}.{bad_column}",
        )
    return matrix


@router.post(
    "/{job_id}/predict",
    operation_id="predict",
    responses=errors(404, 409, 410, 413),
    response_model=PredictResponse | PrivatePredictResponse,
)
def predict(
    body: PredictRequest,
    job: OwnedJob,
    store: StoreDep,
    settings: SettingsDep,
    cache: ModelCacheDep,
    principal: CurrentPrincipal,
    db: DatabaseDep,
) -> PredictResponse | PrivatePredictResponse:
    """Predict class labels and probabilities for rows of features (ONNX Runtime).

    Rows must have the model's `num_features` finite values; at most a configured number of
    rows per request (4096 by default). A job that has not succeeded answers 409, one whose
    model was deleted with its dataset 410. Each prediction is recorded in the audit trail.

    A pate job answers labels only (`PrivatePredictResponse`): the Gaussian noisy argmax of
    its teachers' votes, the request's rows charged to the dataset's budget as that many
    GNMax answers before any is drawn; 409 (`budget-exceeded`, with `epsilon_remaining`)
    when the budget cannot pay them all, and nothing is charged or answered.
    """
    max_rows = settings.limits.max_predict_rows
    if len(body.inputs) > max_rows:
        raise InvalidInput(
            f"at most {max_rows} rows per request; got {len(body.inputs)}",
            field="inputs",
            limit=max_rows,
        )
    if job.spec.kind == "pate":
        return answer_privately(
            job=job,
            rows=body.inputs,
            matrix=_matrix,
            store=store,
            settings=settings,
            cache=cache,
            principal=principal,
            db=db,
        )
    key, digest = _artifact(job, "onnx")
    _require_files(job)
    model = cache.get(job.id, digest, lambda: store.fetch(key))
    result = model.predict(_matrix(body.inputs, model.num_features))
    # Recorded before the answer leaves; rows, never their values.
    audit.record_now(db, principal, "model.predict", "job", job.id, {"rows": len(body.inputs)})
    indices = result.indices.tolist()
    return PredictResponse(
        predictions=[model.classes[i] for i in indices],
        class_indices=indices,
        probabilities=result.probabilities.tolist(),
        receipt_id=job.privacy.ledger_entry_id if job.privacy else None,
        model_sha256=digest,
    )
