"""Trained models: cards, predictions, signed receipts and the signing keys."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from api.schemas.common import _In
from ppml.privacy.evaluation import Metrics
from ppml.trust.records import SignatureRecord


class ReceiptPrivacy(BaseModel):
    """The differential-privacy guarantee of a model, as its receipt states it."""

    epsilon: float = Field(description="ε spent by the training run (RDP accountant).")
    delta: float
    accountant: str = Field(examples=["rdp"])
    privacy_unit: Literal["record", "client"]
    noise_multiplier: float = Field(description="σ of the Gaussian noise.")
    max_grad_norm: float = Field(description="Clipping norm C.")
    sample_rate: float = Field(description="Poisson sampling rate q.")
    sampling: str = Field(examples=["poisson"])
    steps: int = Field(description="Noisy steps (or federated rounds) actually run.")
    grid_version: str | None = Field(description="The RDP order grid that priced the charge.")
    ledger_entry_id: str | None = Field(
        description="The budget-ledger entry that committed this charge."
    )


class ModelArchitecture(BaseModel):
    arch: str
    num_features: int
    num_classes: int
    hidden_sizes: list[int]
    channels: list[int]
    kernel_size: int


class ModelCard(BaseModel):
    """A trained model's privacy receipt, metrics on held-out data and artefact digests."""

    job_id: str
    dataset_id: str
    private: bool
    privacy: ReceiptPrivacy | None = Field(description="null for a non-private model.")
    privacy_unit: Literal["record", "client"]
    architecture: ModelArchitecture | None
    classes: list[str] = Field(description="Class labels, in the order of the model's outputs.")
    libraries: dict[str, str] = Field(description="Versions of ppml, torch, opacus, dp-accounting.")
    metrics: Metrics | None = Field(description="The released held-out metrics.")
    receipt: dict[str, str] = Field(description="The privacy receipt, as in the file metadata.")
    artifacts: dict[str, dict[str, str]] = Field(description="sha256 of each artefact format.")


FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class PredictRequest(_In):
    inputs: list[list[FiniteFloat]] = Field(
        min_length=1,
        description="Rows of num_features finite numbers (features scaled as in training).",
        examples=[[[0.0, 0.25, 1.0]]],
    )


class PredictResponse(BaseModel):
    predictions: list[str] = Field(description="The predicted class label of each row.")
    class_indices: list[int] = Field(description="The predicted class index of each row.")
    probabilities: list[list[float]] = Field(
        description="Class probabilities of each row, in the order of the model card's classes."
    )
    receipt_id: str | None = Field(
        description="The ledger entry of the model's privacy charge (the card's "
        "privacy.ledger_entry_id); null for a non-private model."
    )
    model_sha256: str = Field(description="sha256 of the ONNX artefact that answered.")


class PrivatePredictResponse(BaseModel):
    """A pate job's answers: labels only (GNMax of the teachers' votes), each one charged."""

    predictions: list[str] = Field(description="The noisy-argmax class label of each row.")
    class_indices: list[int] = Field(description="The noisy-argmax class index of each row.")
    queries: int = Field(description="Answers charged by this request (its rows).")
    queries_total: int = Field(description="Answers the job has charged so far.")
    epsilon_charged: float = Field(
        description="ε of this request's answers alone, at the dataset's δ (the n-fold "
        "composition of GNMax)."
    )
    epsilon_remaining: float = Field(description="What the dataset's budget admits after it.")
    noise_multiplier: float = Field(description="sigma of GNMax on the vote counts.")
    ledger_entry_id: str = Field(description="The ledger's COMMIT entry of this charge.")


class SigningKey(BaseModel):
    """A public key of the service's receipt signatures, with its validity."""

    key_id: str
    algorithm: str = Field(examples=["Ed25519"])
    public_key: str = Field(description="The raw 32-byte Ed25519 public key, base64.")
    created_at: str = Field(description="ISO-8601: signatures stating an earlier time fail.")
    retired_at: str | None = Field(
        description="ISO-8601: signatures stating a later time fail; null while active."
    )


class SigningKeys(BaseModel):
    """Every key that ever signed a receipt (the active one last)."""

    keys: list[SigningKey]


class SignedReceiptFile(BaseModel):
    """A released model's signed receipt, served as canonical JSON (sorted keys, no spaces):
    save the bytes as they come; `ppml receipts verify` refuses any other spelling."""

    receipt: dict[str, Any] = Field(
        description="The signed document: `format`, `issued_at`, `job_id`, `artifacts` "
        "(sha256 per format), `dataset` (`id`, `fingerprint`), `privacy` (ε, δ and each "
        "mechanism with its ε), `ledger` (the job's `entries` and the `chain_head` at "
        "release) and `receipt` (the privacy receipt the model files carry)."
    )
    signature: SignatureRecord = Field(
        description="Ed25519 over the canonical JSON of `receipt`, by the key `key_id`."
    )
