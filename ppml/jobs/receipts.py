"""The privacy receipt of a trained model: made once, stored on the job, rendered into files.

The worker builds a :class:`~ppml.jobs.records.Receipt` from the job's final privacy record
before it writes the model; the lifecycle stores it on the job row with the files; the model
files' metadata (:func:`file_metadata`) and the model card are renderings of that record,
never parsed back out of a file.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ppml.db.models import Dataset, Job
from ppml.jobs.records import PrivacyRecord, Receipt
from ppml.privacy.evaluation import Metrics

__all__ = ["build_receipt", "file_metadata", "library_versions"]

_LIBRARIES = ("ppml", "torch", "opacus", "dp-accounting")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that trained and accounted the model."""

    def _version(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "unknown"

    return {name: _version(name) for name in _LIBRARIES}


def build_receipt(
    job: Job,
    dataset: Dataset,
    *,
    privacy: PrivacyRecord | None,
    metrics: Metrics | None,
    architecture: dict[str, Any],
) -> Receipt:
    """The receipt of ``job``'s model; ``privacy`` is its final record (steps run, ε spent).

    The privacy unit is the job's mechanism's (the dataset's for a non-private job).
    """
    unit = privacy.unit if privacy is not None else dataset.privacy_unit
    federated = job.spec.federated
    return Receipt(
        job_id=job.id,
        dataset_id=dataset.id,
        private=privacy is not None,
        privacy_unit="client" if unit == "client" else "record",
        privacy=privacy,
        libraries=library_versions(),
        architecture=architecture,
        classes=[str(label) for label in dataset.classes.get("labels", [])],
        metrics=metrics,
        rounds_planned=federated.rounds if federated is not None else None,
    )


def file_metadata(receipt: Receipt) -> dict[str, str]:
    """The receipt as the string metadata of safetensors and ONNX files.

    Flat figures are strings (``repr`` of floats, so they round-trip exactly); nested values
    are JSON. The ledger entry id is not there: the commit entry is written after the files.
    """
    metadata = {
        "format": receipt.format,
        "job_id": receipt.job_id,
        "dataset_id": receipt.dataset_id,
        "privacy_unit": receipt.privacy_unit,
        "private": "true" if receipt.private else "false",
        "libraries": json.dumps(receipt.libraries, sort_keys=True),
        "architecture": json.dumps(receipt.architecture, sort_keys=True),
        "classes": json.dumps(receipt.classes),
        "metrics": json.dumps(
            receipt.metrics.model_dump(mode="json") if receipt.metrics else None, sort_keys=True
        ),
    }
    if receipt.rounds_planned is not None:
        metadata["rounds_planned"] = str(receipt.rounds_planned)
    privacy = receipt.privacy
    if privacy is not None:
        evaluation = privacy.evaluation.model_dump(mode="json") if privacy.evaluation else None
        metadata.update(
            epsilon=repr(privacy.epsilon_spent),
            delta=repr(privacy.delta),
            accountant=privacy.accountant,
            noise_multiplier=repr(privacy.noise_multiplier),
            max_grad_norm=repr(privacy.max_grad_norm),
            sample_rate=repr(privacy.sample_rate),
            sampling=privacy.sampling,
            steps=str(privacy.steps),
            grid_version=privacy.grid_version,
            evaluation=json.dumps(evaluation, sort_keys=True),
        )
    return metadata
