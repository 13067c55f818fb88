"""Private prediction (pate jobs): answers by the Gaussian noisy argmax of the teachers'
votes, each batch charged to the dataset's budget before its noise is drawn.

Labels only: the votes, their shares and any probability stay in this process. The
teachers are one ONNX graph served by onnxruntime (no torch here); no route downloads them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from api.schemas import PrivatePredictResponse
from ppml.config import Settings
from ppml.db.models import Job, JobStatus
from ppml.db.session import Database
from ppml.errors import Gone
from ppml.inference import ModelCache
from ppml.privacy.gnmax import noisy_argmax, vote_counts
from ppml.services.pate import TEACHERS, PateNotReady, charge_answers
from ppml.services.tenants import Principal
from ppml.storage import ArtifactStore
from ppml.trust.keys import SigningKeys

__all__ = ["answer_privately"]

_OUTPUT = "logits"
_INPUT = "input"


class TeachersDeleted(Gone):
    code = "teachers-deleted"
    title = "Teachers deleted"


def _teachers(job: Job) -> tuple[str, str]:
    if job.status != JobStatus.SUCCEEDED:
        raise PateNotReady(f"the job is {job.status}; its teachers answer once it succeeded")
    ref = job.artifacts.get(TEACHERS) if job.artifacts is not None else None
    if ref is None:
        raise PateNotReady("this job has no teachers")
    if job.models_deleted_at is not None:
        raise TeachersDeleted(
            "this job's teachers were deleted with its dataset (delete_models)",
            models_deleted_at=job.models_deleted_at.isoformat(),
        )
    return ref.key, ref.sha256


def answer_privately(
    *,
    job: Job,
    rows: list[list[float]],
    matrix: Callable[[list[list[float]], int], np.ndarray],
    store: ArtifactStore,
    settings: Settings,
    cache: ModelCache,
    principal: Principal,
    db: Database,
) -> PrivatePredictResponse:
    """Votes, then the charge (409 and nothing written when the budget cannot pay), then
    the noise: an answer never leaves uncharged. ``matrix`` turns the rows into float32."""
    key, digest = _teachers(job)
    teachers = cache.get(job.id, digest, lambda: store.fetch(key))
    inputs = matrix(rows, teachers.num_features)
    (logits,) = teachers.session.run([_OUTPUT], {_INPUT: inputs})
    counts = vote_counts(np.asarray(logits), teachers.num_classes)
    charge = charge_answers(
        db,
        job_id=job.id,
        queries=len(rows),
        by=principal,
        keys=SigningKeys.for_settings(settings, store),
    )
    labels = noisy_argmax(counts, charge.sigma).tolist()
    return PrivatePredictResponse(
        predictions=[teachers.classes[i] for i in labels],
        class_indices=labels,
        queries=len(rows),
        queries_total=charge.queries,
        epsilon_charged=charge.epsilon,
        epsilon_remaining=charge.epsilon_remaining,
        noise_multiplier=charge.sigma,
        ledger_entry_id=charge.ledger_entry_id,
    )
