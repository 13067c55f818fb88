"""The privacy receipt of a trained model: made once, stored on the job, rendered into files.

The worker builds a :class:`~ppml.jobs.records.Receipt` from the job's final privacy record
before it writes the model; the lifecycle stores it on the job row with the files; the model
files' metadata (:func:`file_metadata`) and the model card are renderings of that record,
never parsed back out of a file.

When the job ends, in the transaction that settles its charge, :func:`sign_release` signs
what the receipt binds (:func:`receipt_bindings`): the COMMIT entry and the ledger's chain
head exist only then, after the files were written. The signed receipt is served at
``/v1/jobs/{id}/receipt`` and checked offline (``ppml receipts verify``, see
``ppml.trust.receipts``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ppml.db.models import Dataset, Job, LedgerEntry
from ppml.db.repositories import Repositories
from ppml.jobs.records import NodeCharge, PrivacyRecord, Receipt
from ppml.privacy import accounting as acc
from ppml.privacy.evaluation import Metrics
from ppml.trust.keys import SigningKeys
from ppml.trust.receipts import sign_receipt

__all__ = [
    "build_receipt",
    "file_metadata",
    "library_versions",
    "receipt_bindings",
    "sign_release",
]

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
    nodes: list[NodeCharge] | None = None,
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
        nodes=nodes or None,
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


def _mechanisms(privacy: PrivacyRecord) -> list[dict[str, Any]]:
    """Each mechanism the job ran on its data, with its own ε at the job's δ (their RDP
    composition is the ε charged, ``epsilon`` of the receipt's privacy section)."""
    event = privacy.event(privacy.steps)
    if privacy.mechanism == "gnmax":  # PATE's answers, charged as they are asked
        return [
            {
                "name": "predictions",
                "mechanism": "gnmax",
                "unit": privacy.unit,
                "noise_multiplier": privacy.noise_multiplier,
                "queries": privacy.queries,
                "zcdp_rho": privacy.zcdp_rho,
                "epsilon": acc.epsilon(acc.zcdp_curve(privacy.zcdp_rho), privacy.delta),
            }
        ]
    if privacy.zcdp_rho:  # a zCDP mechanism run once (synthetic data: MST)
        return [
            {
                "name": "synthesis",
                "mechanism": privacy.mechanism or "zcdp",
                "unit": privacy.unit,
                "zcdp_rho": privacy.zcdp_rho,
                "epsilon": acc.epsilon(acc.zcdp_curve(privacy.zcdp_rho), privacy.delta),
            }
        ]
    training = replace(event, eval_noise_multiplier=None, eval_releases=0)
    mechanisms: list[dict[str, Any]] = [
        {
            "name": "training",
            "mechanism": "subsampled-gaussian",
            "level": privacy.level,
            "unit": privacy.unit,
            "sample_rate": privacy.sample_rate,
            "sampling": privacy.sampling,
            "noise_multiplier": privacy.noise_multiplier,
            "max_grad_norm": privacy.max_grad_norm,
            "steps": privacy.steps,
            "epsilon": acc.epsilon(acc.rdp_curve(training), privacy.delta),
        }
    ]
    if event.eval_releases and event.eval_noise_multiplier is not None:
        curve = acc.evaluation_curve(event.eval_noise_multiplier, event.eval_releases)
        mechanisms.append(
            {
                "name": "evaluation",
                "mechanism": "gaussian",
                "unit": privacy.unit,
                "noise_multiplier": event.eval_noise_multiplier,
                "releases": event.eval_releases,
                "epsilon": acc.epsilon(curve, privacy.delta),
            }
        )
    return mechanisms


def _privacy(privacy: PrivacyRecord | None) -> dict[str, Any] | None:
    if privacy is None:
        return None
    return {
        "epsilon": privacy.epsilon_spent,
        "delta": privacy.delta,
        "accountant": privacy.accountant,
        "grid_version": privacy.grid_version,
        "unit": privacy.unit,
        "ledger_entry_id": privacy.ledger_entry_id,
        "mechanisms": _mechanisms(privacy),
    }


def _entry(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "kind": entry.kind,
        "epsilon": entry.epsilon,
        "event": entry.event,
        # The tamper-evident ledger's hash of this entry, once the ledger has one.
        "entry_hash": getattr(entry, "entry_hash", None),
    }


def receipt_bindings(repos: Repositories, job: Job) -> dict[str, Any]:
    """What the signed receipt of ``job``'s released model binds.

    Read in the transaction that ends the job, after the ledger settled it and under the
    budget row's lock, so the ledger entries and the chain head are those of the release.
    """
    assert job.artifacts is not None and job.receipt is not None
    dataset = repos.dataset_by_id(job.dataset_id)
    head = repos.newest_ledger_entry(job.dataset_id)
    return {
        "job_id": job.id,
        # A pate job's teachers are private: not even their digest is bound.
        "artifacts": {fmt: {"sha256": ref.sha256} for fmt, ref in job.artifacts.released().items()},
        "dataset": {
            "id": job.dataset_id,
            # The dataset's content fingerprint, once datasets have one.
            "fingerprint": getattr(dataset, "fingerprint", None),
        },
        "privacy": _privacy(job.privacy),
        "ledger": {
            "entries": [_entry(entry) for entry in repos.job_ledger_entries(job.id)],
            "chain_head": None
            if head is None
            else {
                "entry_id": head.id,
                "seq": getattr(head, "seq", None),
                "entry_hash": getattr(head, "entry_hash", None),
            },
        },
        "receipt": job.receipt.model_dump(mode="json", exclude={"signed"}),
    }


def sign_release(repos: Repositories, job: Job, keys: SigningKeys) -> None:
    """Sign the receipt of ``job``'s released model and keep it on the job's receipt.

    ``job`` holds its final artefacts, receipt and privacy record (``lifecycle.finish``).
    """
    assert job.receipt is not None
    signed = sign_receipt(keys, receipt_bindings(repos, job))
    job.receipt = job.receipt.model_copy(update={"signed": signed})
