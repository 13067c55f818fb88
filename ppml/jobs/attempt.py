"""What a job attempt hands the training code and takes back from it: the federated plan
(with its keyed partition) and the published model files with their receipt. The runner
(``ppml.jobs.runner``) decides when; this module knows how."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ppml import datasets as data
from ppml.db.models import Dataset, Job
from ppml.jobs.receipts import build_receipt, file_metadata
from ppml.jobs.records import ArtifactRef, Artifacts, PrivacyRecord, Receipt
from ppml.privacy.evaluation import ReleasedMetrics, scoring_interval
from ppml.specs import JobSpec
from ppml.storage import ArtifactStore

if TYPE_CHECKING:
    from ppml.training.dp_sgd import TrainResult
    from ppml.training.federated import FederatedResult

    Outcome = TrainResult | FederatedResult

__all__ = ["publish_model", "train_federated_job"]

log = logging.getLogger(__name__)


def train_federated_job(
    spec: JobSpec,
    private: PrivacyRecord | None,
    arrays: data.DatasetArrays,
    common: dict[str, Any],
    secret: str | None,
) -> FederatedResult:
    """Train a federated job: its plan and DP from the spec and the priced record, its
    clients placed by keyed hashes of each record (``secret``: the dataset's split secret)."""
    from ppml.training.federated import FederatedDP, FederatedPlan, train_federated

    fed = spec.federated
    assert fed is not None
    dp = None
    if private is not None and spec.privacy is not None:
        dp = FederatedDP(
            level=spec.privacy.level,
            noise_multiplier=private.noise_multiplier,
            clip_norm=spec.privacy.max_grad_norm,
            sample_rate=private.sample_rate,
            delta=private.delta,
        )
    plan = FederatedPlan(
        num_clients=fed.num_clients,
        clients_per_round=fed.clients_per_round,
        rounds=fed.rounds,
        local_epochs=fed.local_epochs,
        partition=fed.partition.scheme,
        alpha=fed.partition.alpha,
        strategy=fed.strategy,
        mu=fed.mu,
        server_learning_rate=fed.server_learning_rate,
        dropout=fed.dropout,
        eval_every=scoring_interval(fed.rounds, fed.evaluate_every),
    )
    keyed: dict[str, Any] = {}
    if fed.partition.scheme != "column":  # placed by keyed hashes of each record alone
        if secret is None:
            raise ValueError("the dataset has no split secret to key its partition with")
        keys, partition_seed = data.partition_keys(
            secret,
            scheme=fed.partition.scheme,
            seed=spec.training.seed,
            x=arrays.x_train,
            labels=np.asarray(arrays.classes)[arrays.y_train],
        )
        keyed = {"record_keys": keys, "partition_seed": partition_seed}
    return train_federated(**common, clients_train=arrays.clients_train, fed=plan, dp=dp, **keyed)


def publish_model(
    store: ArtifactStore,
    job: Job,
    dataset: Dataset,
    result: Outcome,
    privacy: PrivacyRecord | None,
    released: ReleasedMetrics,
) -> tuple[Artifacts, Receipt]:
    """Publish this attempt's model files, with their receipt, under keys of their own.

    They become the job's artefacts only in ``JobRunner._finish``, under the ownership check:
    a worker that lost its lease meanwhile never replaces another attempt's model.
    """
    from ppml.architectures import ModelShape
    from ppml.training.export import export_onnx, save_model

    shape = ModelShape(
        model=job.spec.model,
        num_features=dataset.num_features,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
    )
    receipt = build_receipt(
        job,
        dataset,
        privacy=privacy,
        metrics=released.metrics,
        architecture=shape.as_dict(),
    )
    metadata = file_metadata(receipt)
    stem = f"models/{job.id}.attempt-{job.attempts}"
    weights = store.write(
        f"{stem}.safetensors",
        lambda path: save_model(path, result.state_dict, metadata=metadata),
    )
    files = {"safetensors": ArtifactRef(key=weights.key, sha256=weights.sha256)}
    try:
        graph = store.write(
            f"{stem}.onnx", lambda path: export_onnx(path, result.state_dict, metadata=metadata)
        )
    except Exception:
        # The budget is spent and the weights are safe: a failed export must not lose the
        # job. The API answers 409 for the missing format.
        log.exception("job %s: ONNX export failed; serving safetensors only", job.id)
    else:
        files["onnx"] = ArtifactRef(key=graph.key, sha256=graph.sha256)
    return Artifacts(files), receipt
