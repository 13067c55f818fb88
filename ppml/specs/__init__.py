"""Job specifications: what a user asks for, validated before anything is stored.

Pure pydantic (no torch): the API validates and prices jobs with these, the worker reads the
stored spec back with the same models. The specs of the mechanisms that train no model by
DP-SGD (synthetic data, PATE) live in :mod:`ppml.specs.mechanisms`; federated training's
(simulated clients or a federation's nodes) in :mod:`ppml.specs.federated`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, field_validator, model_validator

from ppml.specs.base import Spec
from ppml.specs.federated import FederatedSpec, PartitionSpec
from ppml.specs.mechanisms import PateSpec, StudentSpec, SynthesizeSpec

__all__ = [
    "EvaluationSpec",
    "FederatedSpec",
    "JobSpec",
    "ModelSpec",
    "PartitionSpec",
    "PateSpec",
    "PreprocessingSpec",
    "PrivacySpec",
    "ResourcesSpec",
    "StudentSpec",
    "SynthesizeSpec",
    "TrainingSpec",
    "request_hash",
]

PositiveSize = Annotated[int, Field(strict=True, ge=1, le=4096)]


class ModelSpec(Spec):
    """Architecture of the model to train."""

    # One entry per name in ppml.architectures (count, validation); a test keeps them equal.
    arch: Literal["logreg", "mlp", "cnn1d", "cnn2d"] = Field(
        description="Model architecture. cnn2d needs a dataset that declares a 3-D "
        "input_shape [channels, height, width] in its schema."
    )
    hidden_sizes: list[PositiveSize] = Field(
        default=[128], max_length=8, description="Widths of the hidden layers (mlp)."
    )
    channels: list[PositiveSize] = Field(
        default=[16, 32],
        min_length=1,
        max_length=6,
        description="Output channels of each conv block (cnn1d, cnn2d).",
    )
    kernel_size: int = Field(
        strict=True,
        default=5,
        ge=1,
        le=31,
        description="Conv kernel size (cnn1d; cnn2d: kernel_size x kernel_size).",
    )


class TrainingSpec(Spec):
    """Optimisation settings."""

    epochs: int = Field(
        strict=True, ge=1, le=10_000, description="Passes over the training records."
    )
    batch_size: int = Field(strict=True, ge=1, le=65_536, description="Expected batch size.")
    learning_rate: float = Field(
        strict=True, ge=1e-8, le=100, description="Optimiser learning rate."
    )
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(strict=True, default=0.0, ge=0, lt=1, description="SGD momentum.")
    seed: int = Field(strict=True, default=0, ge=0, le=2**31 - 1)
    ema_decay: float = Field(
        strict=True,
        default=0.0,
        ge=0,
        lt=1,
        description="Decay of an exponential moving average of the weights, which becomes "
        "the model (free post-processing: σ and the charge do not change); 0: the last "
        "weights. Centralised jobs on one GPU only.",
    )
    max_runtime_s: int | None = Field(
        strict=True,
        default=None,
        ge=1,
        description="Stop the job after this many seconds (capped).",
    )


class EvaluationSpec(Spec):
    """How the held-out metrics analysts see are released (PRIVACY.md: held-out rows are
    protected rows). Owners always see the exact figures."""

    epsilon_share: float = Field(
        strict=True,
        default=0.03,
        ge=0,
        le=0.5,
        description="Fraction of target_epsilon spent on a Gaussian release of the held-out "
        "metrics (correct predictions and clipped loss, summed per privacy unit). 0 shows "
        "analysts no metrics. Ignored on public data and when the dataset has a public "
        "validation set (exact and free there).",
    )
    loss_clip: float = Field(
        strict=True,
        default=4.0,
        gt=0,
        le=100,
        description="Per-example cross-entropy is clipped to this bound before it is summed.",
    )


class PrivacySpec(Spec):
    """Differential privacy of the job. σ is calibrated so the job spends ``target_epsilon``."""

    target_epsilon: float = Field(strict=True, ge=1e-3, le=100, description="ε this job may spend.")
    delta: float | None = Field(
        strict=True,
        default=None,
        gt=0,
        lt=1,
        description="δ of the job; defaults to the dataset's δ.",
    )
    max_grad_norm: float = Field(
        strict=True, default=1.0, ge=1e-6, le=1e4, description="Clipping norm C."
    )
    level: Literal["sample", "client"] = Field(
        default="sample", description="Privacy unit: one record, or one federated client."
    )
    sampling: Literal["poisson", "shuffle"] = Field(
        default="poisson",
        description="Batch sampling. Only Poisson sampling matches the accountant; "
        "shuffling is refused.",
    )
    evaluation: EvaluationSpec = EvaluationSpec()


class ResourcesSpec(Spec):
    """What one job runs on."""

    gpus: int = Field(
        strict=True,
        default=1,
        ge=1,
        le=64,
        description="Data-parallel replicas (GPUs; worker processes on CPU-only workers) of a "
        "centralised DP-SGD job. Each replica clips its share of the Poisson batch and the "
        "noise is added once, so the privacy cost is the same. At most the server's "
        "limits.max_job_gpus.",
    )


class PreprocessingSpec(Spec):
    """What is done to each row before the model sees it, in training and in the exported
    model alike."""

    standardize: bool = Field(
        default=False,
        description="Clip every feature to the dataset's released bounds, subtract its "
        "released mean and divide by its released standard deviation: the dataset's DP "
        "statistics (POST /v1/datasets/{id}/statistics), charged once and reused by every "
        "job at no further cost. The downloaded and served models apply the same transform "
        "to their inputs. Kind 'train' only.",
    )


#: Placeholders of the training fields for jobs that train nothing (kind synthesize).
_NO_MODEL = ModelSpec(arch="logreg")
_NO_TRAINING = TrainingSpec(epochs=1, batch_size=1, learning_rate=1.0)


#: A DP-SGD job as the API's examples show it (the README's walk-through submits the same).
JOB_SPEC_EXAMPLE: dict[str, Any] = {
    "name": "digits-dp",
    "dataset_id": "ds_01j9zq3k8c6w2f4b7t5m0n1p2r",
    "model": {"arch": "mlp", "hidden_sizes": [128]},
    "training": {"epochs": 10, "batch_size": 64, "learning_rate": 0.5, "seed": 0},
    "privacy": {"target_epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0, "level": "sample"},
    "federated": None,
}


class JobSpec(Spec):
    """A job on one dataset: training a model (``kind: train``) or synthesizing a table."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_SPEC_EXAMPLE]})

    name: str = Field(min_length=1, max_length=200, description="A name for people to read.")
    dataset_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=40,
        description="The dataset to train on (and charge). Absent for a job on a federation "
        "(federated.federation_id): ppml then sets it to the federation's backing dataset.",
    )
    kind: Literal["train", "synthesize", "pate"] = Field(
        default="train",
        description="train: a model (DP-SGD, DP-FedAvg); synthesize: a DP synthetic table "
        "(MST), set in 'synthesize'; pate: teachers that answer predictions privately "
        "(GNMax, each answer charged), set in 'pate' with the teachers' model and training.",
    )
    model: ModelSpec = Field(
        default=_NO_MODEL,
        description="The model. Optional for kind 'train': left out, ppml chooses it from "
        "public metadata only (rows, features or input shape, classes, ε, δ; docs/defaults.md) "
        "and lists it in defaults_applied. Required for kind 'pate' (each teacher's); unused "
        "otherwise.",
    )
    training: TrainingSpec = Field(
        default=_NO_TRAINING,
        description="Optimisation settings. Optional for kind 'train', chosen like 'model' "
        "when left out. Required for kind 'pate' (each teacher's); unused otherwise.",
    )
    defaults_applied: list[Literal["model", "training", "preprocessing"]] = Field(
        default_factory=list,
        max_length=3,
        description="Set by ppml, ignored in requests: the fields ppml chose because the "
        "request left them out (docs/defaults.md). The job resource's spec holds what was "
        "chosen.",
    )
    synthesize: SynthesizeSpec | None = Field(
        default=None, description="The synthetic table (kind 'synthesize')."
    )
    pate: PateSpec | None = Field(
        default=None, description="The teachers and the answers' noise (kind 'pate')."
    )
    privacy: PrivacySpec | None = Field(
        description="null trains without privacy (only on datasets without a budget); null "
        "for kind 'pate' too, whose teachers train without DP and whose answers are charged."
    )
    federated: FederatedSpec | None = None
    resources: ResourcesSpec = ResourcesSpec()
    preprocessing: PreprocessingSpec = PreprocessingSpec()
    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        description="An http(s) URL that receives a signed POST when the job succeeds, fails "
        "or is cancelled (docs/api.md, 'Webhooks'). The signing secret comes once, in the "
        "answer that creates the job.",
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError("webhook_url must be an http or https URL")
        if not parts.hostname or parts.username is not None or parts.password is not None:
            raise ValueError("webhook_url needs a host and no user or password")
        if parts.fragment:
            raise ValueError("webhook_url must not have a fragment")
        return value

    @property
    def federation_id(self) -> str | None:
        return None if self.federated is None else self.federated.federation_id

    @model_validator(mode="after")
    def _kind(self) -> JobSpec:
        given = self.model_fields_set
        if self.dataset_id is None and self.federation_id is None:
            raise ValueError("dataset_id is required (or federated.federation_id)")
        if self.kind != "synthesize" and self.synthesize is not None:
            raise ValueError("'synthesize' applies to kind 'synthesize'")
        if self.kind != "pate" and self.pate is not None:
            raise ValueError("'pate' applies to kind 'pate'")
        if self.kind != "train" and self.preprocessing != PreprocessingSpec():
            raise ValueError("'preprocessing' applies to kind 'train'")
        if self.kind == "train":  # left-out model and training are chosen (ppml.defaults)
            averaged = self.training.ema_decay > 0
            if averaged and (self.federated is not None or self.resources.gpus > 1):
                raise ValueError("training.ema_decay applies to centralised jobs on one GPU")
            return self
        if self.kind == "pate":
            missing = [f for f in ("model", "training") if f not in given]
            if missing:
                raise ValueError(f"a {self.kind} job needs {' and '.join(missing)}")
            return self._pate()
        # Compared with the placeholders, not the fields set: a stored spec holds them all.
        extra = self.model != _NO_MODEL or self.training != _NO_TRAINING
        if extra or self.federated is not None or self.resources != ResourcesSpec():
            raise ValueError(f"a {self.kind} job takes no model, training, federated or resources")
        if self.synthesize is None:
            self.synthesize = SynthesizeSpec()
        if self.privacy is None:
            raise ValueError(f"a {self.kind} job needs 'privacy' (its target_epsilon)")
        return self

    def _pate(self) -> JobSpec:
        if self.pate is None:
            raise ValueError("a pate job needs 'pate' (its teachers and noise)")
        if self.privacy is not None:
            raise ValueError(
                "a pate job takes privacy null: its teachers train without DP and each "
                "answer is charged by 'pate'"
            )
        if self.federated is not None or self.resources != ResourcesSpec():
            raise ValueError("a pate job takes no federated or resources")
        return self


# The defaults request_hash compares with (built once: it runs on every submit).
_DEFAULT_RESOURCES, _DEFAULT_PREPROCESSING = ResourcesSpec(), PreprocessingSpec()


def request_hash(spec: JobSpec) -> str:
    """Canonical hash of a job request, for ``Idempotency-Key`` comparisons (a spec without a
    webhook or resources hashes as it did before the field existed)."""
    later = {"webhook_url"} if not spec.webhook_url else set()
    if not spec.defaults_applied:
        later.add("defaults_applied")
    if spec.resources == _DEFAULT_RESOURCES:
        later.add("resources")
    if spec.pate is None:
        later.add("pate")
    if spec.preprocessing == _DEFAULT_PREPROCESSING:
        later.add("preprocessing")
    if spec.kind == "train":
        later |= {"kind", "synthesize"}
    exclude: dict[str, Any] = dict.fromkeys(later, True)
    if spec.training.ema_decay == 0:
        exclude["training"] = {"ema_decay"}
    body = spec.model_dump(mode="json", exclude=exclude or None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
