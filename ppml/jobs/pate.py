"""A pate job's attempt: partition the training records by a keyed hash, train one teacher
per partition (no DP), and keep them as one private ONNX graph that the API answers from
(``POST /v1/jobs/{id}/predict``, each batch of answers charged: ``ppml.services.pate``).

Each record goes to teacher ``floor(u · k)``, ``u`` uniform from a keyed hash of the record
alone under the dataset's secret (``ppml.datasets.keys``): every record is in exactly one
partition, and adding or removing one record moves no other (PRIVACY.md, "the split and
the partitions"). The teachers are never released: no route serves them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ppml.architectures import ModelShape
from ppml.datasets.arrays import DatasetArrays
from ppml.datasets.keys import record_keys, uniform
from ppml.db.models import Dataset, Job, JobStatus
from ppml.jobs import lifecycle
from ppml.jobs.receipts import build_receipt, file_metadata
from ppml.jobs.records import ArtifactRef, Artifacts, JobError, Receipt
from ppml.jobs.synthesis import leased_ending
from ppml.privacy.gnmax import noisy_argmax, vote_counts
from ppml.services.pate import PARTITION_DOMAIN, TEACHERS
from ppml.storage import ArtifactStore

if TYPE_CHECKING:
    import torch

__all__ = ["pate_ending", "pate_job", "teacher_partitions"]


def teacher_partitions(
    arrays: DatasetArrays, *, secret: str, teachers: int, seed: int
) -> list[npt.NDArray[np.int64]]:
    """The training rows of each teacher: disjoint, covering every training record once."""
    labels = np.asarray(arrays.classes)[arrays.y_train]
    keys = record_keys(secret, f"{PARTITION_DOMAIN}:{seed}", arrays.x_train, labels)
    owner = np.minimum((uniform(keys) * teachers).astype(np.int64), teachers - 1)
    return [np.flatnonzero(owner == j).astype(np.int64) for j in range(teachers)]


def pate_job(
    store: ArtifactStore,
    job: Job,
    dataset: Dataset,
    arrays: DatasetArrays,
    *,
    secret: str,
    cancelled: Callable[[], bool],
    public: Callable[[str], DatasetArrays] | None = None,
) -> lifecycle.Ending:
    """Train the teachers and publish them (privately), and the student if the spec asks
    (``public`` loads its public dataset by id); the ending the runner finishes with."""
    from ppml.training.export import export_ensemble
    from ppml.training.pate import train_teachers

    pate, privacy = job.spec.pate, job.privacy
    assert pate is not None and privacy is not None
    inputs = None
    if pate.student is not None:
        assert public is not None
        try:  # before any private row is read: a failure here is released whole
            inputs = public(pate.student.public_dataset_id)
        except Exception as exc:
            error = JobError(code="student_data", message=type(exc).__name__)
            return lifecycle.Ending(status=JobStatus.FAILED, steps=None, note="failed", error=error)
    partitions = teacher_partitions(
        arrays, secret=secret, teachers=pate.teachers, seed=job.spec.training.seed
    )
    weights = train_teachers(
        x=arrays.x_train,
        y=arrays.y_train,
        partitions=partitions,
        num_classes=arrays.num_classes,
        model=job.spec.model,
        training=job.spec.training,
        input_shape=dataset.input_shape,
        progress=lambda _done: not cancelled(),
    )
    if weights is None:
        return lifecycle.Ending(status=JobStatus.CANCELLED, steps=0, note="cancelled")
    shape = ModelShape(
        model=job.spec.model,
        num_features=dataset.num_features,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
    )
    receipt = build_receipt(
        job,
        dataset,
        privacy=privacy.finished(0, None),
        metrics=None,
        architecture={
            "kind": "pate-teachers",
            "teachers": pate.teachers,
            "teacher": shape.as_dict(),
            "partition": "keyed-hash",
            "aggregation": "gnmax",
            "sigma": privacy.noise_multiplier,
        },
    )
    # The graph's metadata: what the API needs to read it (one teacher's shape), no receipt.
    metadata = {
        "architecture": json.dumps(shape.as_dict(), sort_keys=True),
        "classes": file_metadata(receipt)["classes"],
        "teachers": str(pate.teachers),
    }
    stem = f"models/{job.id}.attempt-{job.attempts}"
    graph = store.write(
        f"{stem}.teachers.onnx", lambda path: export_ensemble(path, weights, metadata=metadata)
    )
    files = {TEACHERS: ArtifactRef(key=graph.key, sha256=graph.sha256)}
    if inputs is not None:
        student, receipt = _student(store, job, dataset, inputs, weights, receipt)
        files.update(student)
    artifacts = Artifacts(files)
    return lifecycle.Ending(
        status=JobStatus.SUCCEEDED, steps=0, note="succeeded", artifacts=artifacts, receipt=receipt
    )


def pate_ending(
    store: ArtifactStore,
    job: Job,
    dataset: Dataset,
    *,
    arrays: Callable[[], DatasetArrays],
    secret: Callable[[], str | None],
    renew: Callable[[], tuple[bool, bool]],
    lease_seconds: float,
    public: Callable[[str], DatasetArrays] | None = None,
) -> lifecycle.Ending | None:
    """Run a claimed pate job under its lease (``ppml.jobs.synthesis.leased_ending``); a
    cancel stops it between two teachers. None: the lease was lost."""
    state = {"cancel": False}

    def renewing() -> tuple[bool, bool]:
        owner, cancel = renew()
        state["cancel"] = cancel
        return owner, cancel

    def run() -> lifecycle.Ending:
        key = secret()
        if key is None:
            raise ValueError("the dataset has no split secret")
        return pate_job(
            store,
            job,
            dataset,
            arrays(),
            secret=key,
            cancelled=lambda: state["cancel"],
            public=public,
        )

    return leased_ending(
        store, job, run, renew=renewing, lease_seconds=lease_seconds, error_code="training_error"
    )


def _student(
    store: ArtifactStore,
    job: Job,
    dataset: Dataset,
    public: DatasetArrays,
    weights: Sequence[dict[str, torch.Tensor]],
    teachers: Receipt,
) -> tuple[dict[str, ArtifactRef], Receipt]:
    """Label the first ``queries`` public rows by GNMax (their charge was reserved at
    admission), train the student on them and publish it as an ordinary model, whose
    receipt's cost is those answers."""
    from ppml.training.export import export_onnx, save_model
    from ppml.training.pate import teacher_logits, train_student

    pate, privacy = job.spec.pate, job.privacy
    assert pate is not None and pate.student is not None and privacy is not None
    rows = np.concatenate([public.x_train, public.x_test])[: pate.student.queries]
    model, training = job.spec.model, job.spec.training
    shape = ModelShape(
        model=model,
        num_features=dataset.num_features,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
    )
    logits = teacher_logits(
        weights, model=model, num_classes=dataset.num_classes, x=rows, input_shape=shape.input_shape
    )
    labels = noisy_argmax(vote_counts(logits, dataset.num_classes), privacy.noise_multiplier)
    state = train_student(
        x=rows,
        labels=labels,
        num_classes=dataset.num_classes,
        model=model,
        training=training,
        input_shape=shape.input_shape,
    )
    # The student is an ordinary model: its files state its shape (what loads it), and its
    # receipt's privacy the answers it cost (mechanism gnmax, queries, rho, ε).
    architecture = shape.as_dict()
    receipt = teachers.model_copy(update={"architecture": architecture})
    metadata = file_metadata(receipt)
    stem = f"models/{job.id}.attempt-{job.attempts}.student"
    weights_file = store.write(
        f"{stem}.safetensors", lambda path: save_model(path, state, metadata=metadata)
    )
    graph = store.write(f"{stem}.onnx", lambda path: export_onnx(path, state, metadata=metadata))
    files = {
        "safetensors": ArtifactRef(key=weights_file.key, sha256=weights_file.sha256),
        "onnx": ArtifactRef(key=graph.key, sha256=graph.sha256),
    }
    return files, receipt
