"""What a job attempt hands the training code and takes back from it: the training plan,
the federated plan (with its keyed partition) and the published model files with their
receipt. The runner
(``ppml.jobs.runner``) decides when; this module knows how."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ppml import datasets as data
from ppml.datasets.statistics import DatasetStatistics, standardize
from ppml.db.models import Dataset, Job
from ppml.jobs.heartbeat import Heartbeat
from ppml.jobs.inputs import JobInputs
from ppml.jobs.receipts import build_receipt, file_metadata
from ppml.jobs.records import ArtifactRef, Artifacts, PrivacyRecord, Receipt
from ppml.jobs.schedule import Schedule
from ppml.privacy.evaluation import DEFAULT_LOSS_CLIP, ReleasedMetrics, scoring_interval
from ppml.specs import JobSpec
from ppml.storage import ArtifactStore

if TYPE_CHECKING:
    from ppml.jobs.federation import FederationOutcome
    from ppml.training.dp_sgd import TrainResult
    from ppml.training.federated import FederatedResult

    Outcome = TrainResult | FederatedResult | FederationOutcome

__all__ = ["publish_model", "train_attempt", "train_federated_job"]

log = logging.getLogger(__name__)


def train_attempt(
    job: Job,
    dataset: Dataset,
    inputs: JobInputs,
    schedule: Schedule,
    *,
    beat: Heartbeat,
    checkpoint: Callable[[dict[str, Any]], None],
    resume: dict[str, Any] | None,
    report_every: int,
) -> Outcome:
    """Train one attempt of a DP-SGD or federated job from its spec and priced record:
    ``beat`` receives its reports, ``checkpoint`` its states, ``resume`` the state to go on
    from (None: from the start)."""
    from ppml.training.dp_sgd import TrainingPlan  # torch: worker only

    spec = job.spec
    arrays = inputs.arrays(dataset)
    scoring = inputs.scoring(dataset, arrays)
    x_train, x_test = arrays.x_train, scoring["x_test"]
    if spec.preprocessing.standardize:  # the exported model applies the same transform
        stats = inputs.statistics(dataset, arrays.x_train)
        x_train, x_test = standardize(x_train, stats), standardize(x_test, stats)
    loss_clip = spec.privacy.evaluation.loss_clip if spec.privacy else DEFAULT_LOSS_CLIP
    plan = TrainingPlan(
        model=spec.model,
        epochs=spec.training.epochs if spec.federated is None else 1,
        batch_size=spec.training.batch_size,
        learning_rate=spec.training.learning_rate,
        optimizer=spec.training.optimizer,
        momentum=spec.training.momentum,
        ema_decay=spec.training.ema_decay,
        seed=spec.training.seed,
        steps_per_epoch=schedule.steps_per_epoch if spec.federated is None else 1,
        total_steps=schedule.total_steps if spec.federated is None else 1,
        eval_loss_clip=loss_clip,
        test_units=scoring["test_units"],
        input_shape=dataset.input_shape,
    )
    private = job.privacy if spec.privacy is not None else None
    common: dict[str, Any] = {
        "x_train": x_train,
        "y_train": arrays.y_train,
        "x_test": x_test,
        "y_test": scoring["y_test"],
        "num_classes": arrays.num_classes,
        "plan": plan,
        "callbacks": beat,
        "checkpoint": checkpoint,
        "resume": resume,
    }
    if spec.federated is not None:
        return train_federated_job(spec, private, arrays, common, inputs.secret(dataset))
    from ppml.training.dp_sgd import DPPlan, train

    dp = None
    if private is not None and spec.privacy is not None:
        dp = DPPlan(
            noise_multiplier=private.noise_multiplier,
            max_grad_norm=spec.privacy.max_grad_norm,
            sample_rate=private.sample_rate,
            delta=private.delta,
        )
    if spec.resources.gpus > 1 and dp is not None:
        from ppml.training.parallel import train_parallel

        return train_parallel(
            **common, dp=dp, world_size=spec.resources.gpus, report_every=report_every
        )
    return train(**common, dp=dp, report_every=report_every)


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
    statistics: DatasetStatistics | None = None,
) -> tuple[Artifacts, Receipt]:
    """Publish this attempt's model files, with their receipt, under keys of their own.
    ``statistics``: the standardisation the job trained with, baked into both files' graph.

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
        standardize=_scaling(statistics),
    )
    receipt = build_receipt(
        job,
        dataset,
        privacy=privacy,
        metrics=released.metrics,
        architecture=shape.as_dict(),
        nodes=getattr(result, "nodes", None),
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


def _scaling(
    statistics: DatasetStatistics | None,
) -> tuple[tuple[float, float, float, float], ...] | None:
    """Per feature (low, high, mean, std) of released statistics (ModelShape.standardize)."""
    if statistics is None:
        return None
    assert statistics.bounds is not None and statistics.mean is not None
    assert statistics.std is not None
    return tuple(
        (low, high, mean, std)
        for (low, high), mean, std in zip(
            statistics.bounds, statistics.mean, statistics.std, strict=True
        )
    )
