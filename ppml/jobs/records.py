"""Typed records of a job row's JSON columns, validated on the way in and out of the database.

Each column has one shape, defined here (metrics in ``ppml.privacy.evaluation``); the API
answers with these same models. Records are frozen: a change is a new record, assigned whole.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from ppml.privacy import accounting as acc
from ppml.privacy.evaluation import EvaluationPlan, Metrics
from ppml.trust.records import SignedReceipt

__all__ = [
    "PRIVATE_ARTIFACTS",
    "ArtifactRef",
    "Artifacts",
    "JobError",
    "NodeCharge",
    "PrivacyRecord",
    "Progress",
    "Receipt",
]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Progress(_Record):
    """How far a job has come, as its worker last reported."""

    fraction: float = Field(ge=0, le=1)
    epoch: int = Field(ge=0)
    round: int | None = Field(default=None, description="Federated round (federated jobs).")
    steps: int = Field(ge=0)
    epsilon_spent: float | None = Field(
        default=None,
        description="ε of the steps reported so far (private jobs), at the job's δ; "
        "the evaluation releases are counted once the job has ended.",
    )
    eta_seconds: float | None = Field(
        default=None,
        description="Seconds the worker expects the rest to take, at its pace since it "
        "claimed the job; null when it cannot tell yet, and once the job has ended.",
    )


class JobError(_Record):
    """Why a job failed: a code and a message that carry no data values."""

    code: str
    message: str


class ArtifactRef(_Record):
    """A published file: its key in the artefact store and its SHA-256."""

    key: str
    sha256: str


#: Artefacts that never leave the service, nor does any function of them (their digest
#: included): a pate job's teachers are trained without DP.
PRIVATE_ARTIFACTS = frozenset({"teachers"})


class Artifacts(RootModel[dict[str, ArtifactRef]]):
    """The model files a job published, by format (``safetensors``, ``onnx``)."""

    model_config = ConfigDict(frozen=True)

    def get(self, fmt: str) -> ArtifactRef | None:
        return self.root.get(fmt)

    def formats(self) -> list[str]:
        return list(self.root)

    def released(self) -> dict[str, ArtifactRef]:
        """The artefacts whose digests may be shown and signed (not the private ones)."""
        return {fmt: ref for fmt, ref in self.root.items() if fmt not in PRIVATE_ARTIFACTS}


class PrivacyRecord(_Record):
    """A private job's mechanism: its plan at admission, its outcome at the end."""

    target_epsilon: float
    epsilon_planned: float = Field(description="ε of the whole plan, metrics included.")
    epsilon_spent: float | None = Field(description="ε committed (null until the job ends).")
    delta: float
    noise_multiplier: float = Field(description="σ of the training noise.")
    max_grad_norm: float = Field(description="Clipping norm C.")
    sample_rate: float = Field(description="Poisson sampling rate q.")
    sampling: str = "poisson"
    steps: int = Field(description="Noisy steps (or rounds) run.")
    steps_planned: int
    charge_interval: int = Field(
        default=0, description="Steps that may run between two progress reports."
    )
    unit: Literal["record", "client"] = Field(description="The privacy unit protected.")
    level: Literal["sample", "client"] = "sample"
    accountant: str = "rdp"
    grid_version: str
    charged_at: Literal["service", "nodes"] = Field(
        default="service",
        description="Where the charge is kept: the service's ledger, or each federation "
        "node's own ledger (sample-level jobs on a record-unit federation: every node "
        "computes and charges its own ε; nothing is charged here).",
    )
    evaluation: EvaluationPlan | None = Field(
        default=None, description="How the held-out metrics are released and charged."
    )
    ledger_entry_id: str | None = Field(
        default=None, description="The ledger entry that committed the charge."
    )
    zcdp_rho: float = Field(
        default=0.0,
        description="rho of a mechanism stated in zCDP (synthetic data: MST), charged as α·rho.",
    )
    mechanism: str | None = Field(
        default=None,
        description="That mechanism's name (mst, gnmax); null for DP-SGD jobs.",
    )
    queries: int = Field(
        default=0,
        ge=0,
        description="Answers charged so far (pate jobs: GNMax, noise_multiplier is its sigma "
        "on the vote counts and zcdp_rho is queries/sigma²).",
    )

    def event(self, steps: int) -> acc.MechanismEvent:
        """The mechanism event of this job after ``steps`` steps, as the ledger charges it
        (the evaluation releases are always whole: see ``MechanismEvent.with_steps``)."""
        evaluation = self.evaluation
        return acc.MechanismEvent(
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            steps=steps,
            sampling=self.sampling,
            unit=self.unit,
            eval_noise_multiplier=evaluation.noise_multiplier if evaluation else None,
            eval_releases=evaluation.scalar_releases if evaluation else 0,
            zcdp_rho=self.zcdp_rho,
            mechanism=self.mechanism,
        )

    def spent(self, steps: int | None) -> float:
        """ε of ``steps`` steps (training and evaluation); None: the data was never touched."""
        if steps is None:
            return 0.0
        return acc.epsilon(acc.rdp_curve(self.event(steps)), self.delta)

    def finished(self, steps: int | None, ledger_entry_id: str | None) -> PrivacyRecord:
        """The record after the job ran ``steps`` steps (None: never touched its data)."""
        return self.model_copy(
            update={
                "steps": steps or 0,
                "epsilon_spent": self.spent(steps),
                "ledger_entry_id": ledger_entry_id,
            }
        )


class NodeCharge(_Record):
    """What one node of a federation spent on a sample-level job: its own ledger holds the
    charge; ε is its plan's mechanism over the rounds it started (never less than what it
    charged)."""

    node_id: str
    name: str
    rounds: int = Field(ge=0, description="Rounds the node started (fetched the weights of).")
    epsilon: float = Field(ge=0)
    delta: float = Field(gt=0, lt=1)
    refused: str | None = Field(
        default=None,
        description="Why the node refused the job (e.g. 'budget: would spend ε=… but this node "
        "has ε=… left'): it was asked nothing more.",
    )


class Receipt(_Record):
    """The privacy receipt of a trained model, stored once on the job; the model files'
    metadata and the model card are renderings of it."""

    format: Literal["ppml-model-v1"] = "ppml-model-v1"
    job_id: str
    dataset_id: str
    private: bool
    privacy_unit: Literal["record", "client"]
    privacy: PrivacyRecord | None
    libraries: dict[str, str]
    architecture: dict[str, object]
    classes: list[str]
    metrics: Metrics | None = Field(description="The released held-out metrics.")
    rounds_planned: int | None = None
    nodes: list[NodeCharge] | None = Field(
        default=None,
        description="A sample-level job on a federation's nodes: what each node spent, "
        "charged on its own ledger (nothing is charged on the service's).",
    )
    signed: SignedReceipt | None = Field(
        default=None,
        description="The receipt as the service signed it when the job ended (this record "
        "without this field, the files' digests, the mechanisms and their ε, the ledger "
        "entries and chain head); None for models released before receipts were signed.",
    )
