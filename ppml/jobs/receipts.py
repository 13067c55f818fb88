"""The privacy receipt that travels inside every model file (safetensors and ONNX metadata)."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ppml.db.models import Dataset, Job
from ppml.privacy import accounting as acc

__all__ = ["receipt_metadata"]


def receipt_metadata(
    job: Job, dataset: Dataset, *, steps: int, metrics: dict[str, Any] | None = None
) -> dict[str, str]:
    """The privacy receipt, as string metadata for the model artefacts (safetensors and ONNX).

    Nested values (``libraries``, ``metrics``, ``evaluation``) are JSON strings. ``metrics``
    are the released metrics with their mechanism (never the owner's exact figures: the
    file goes to analysts too). The privacy unit is the job's mechanism's. The ledger entry
    id is not here: the commit entry is written after the artefacts; the model card adds it.
    """

    def _version(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "unknown"

    libraries = {name: _version(name) for name in ("ppml", "torch", "opacus", "dp-accounting")}
    receipt: dict[str, str] = {
        "format": "ppml-model-v1",
        "job_id": job.id,
        "dataset_id": dataset.id,
        "privacy_unit": str((job.privacy or {}).get("unit") or dataset.privacy_unit),
        "libraries": json.dumps(libraries, sort_keys=True),
        "metrics": json.dumps(metrics, sort_keys=True),
    }
    federated = (job.spec or {}).get("federated")
    if federated:
        receipt["rounds_planned"] = str(federated.get("rounds"))
    if job.privacy is None:
        receipt["private"] = "false"
        return receipt
    final = acc.final_privacy(job.privacy, steps, None)
    receipt.update(
        private="true",
        epsilon=repr(final["epsilon_spent"]),
        delta=repr(final["delta"]),
        accountant=str(final.get("accountant", "rdp")),
        noise_multiplier=repr(final["noise_multiplier"]),
        max_grad_norm=repr(final["max_grad_norm"]),
        sample_rate=repr(final["sample_rate"]),
        sampling=str(final["sampling"]),
        steps=str(steps),
        grid_version=acc.GRID_VERSION,
        evaluation=json.dumps(final.get("evaluation"), sort_keys=True),
    )
    return receipt
