"""Request and response bodies of the HTTP contract (``shared/API.md``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

from ppml.datasets.schema import DatasetSchema
from ppml.jobs.records import JobError, PrivacyRecord, Progress
from ppml.privacy.evaluation import ExactScores, Metrics, MetricsRelease
from ppml.services.audit import AuditAction, ObjectType
from ppml.services.tenants import Role
from ppml.specs import JobSpec
from ppml.trust.records import SignatureRecord

__all__ = [
    "ApiKey",
    "ApiKeyCreate",
    "ApiKeyCreated",
    "ApiKeyPage",
    "AuditEvent",
    "AuditPage",
    "Budget",
    "Dataset",
    "DatasetCreate",
    "DatasetPage",
    "DatasetProblem",
    "DatasetSchema",
    "ExactMetrics",
    "ExactScores",
    "Job",
    "JobPage",
    "JobSpec",
    "LedgerEntry",
    "LedgerPage",
    "Metrics",
    "MetricsRelease",
    "ModelArchitecture",
    "ModelCard",
    "PredictRequest",
    "PredictResponse",
    "PrivacyBudget",
    "Problem",
    "Progress",
    "Quote",
    "ReceiptPrivacy",
    "SignedReceiptFile",
    "SigningKey",
    "SigningKeys",
    "Tenant",
    "TenantCreate",
    "TenantPage",
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """An RFC 9457 problem document; extension members vary by ``type``."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["/problems/budget-exceeded"])
    title: str
    status: int
    detail: str


class TenantCreate(_In):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Tenant(BaseModel):
    id: str
    name: str
    created_at: datetime


class TenantPage(BaseModel):
    items: list[Tenant]
    next_page_token: str | None


ROLE_DESCRIPTION = (
    "owner: registers budgeted datasets, sets budgets, sees exact figures of its data; "
    "analyst: submits jobs, sees only differentially private releases, may register public data."
)


EXPIRES_DESCRIPTION = "When the key stops working (ISO-8601 with a time zone); null: never."


def _iso_text(value: Any) -> Any:
    # Timestamps travel as ISO-8601 text: a number (seconds since 1970?) is a mistake.
    if value is not None and not isinstance(value, str):
        raise ValueError("a timestamp must be an ISO-8601 string with a time zone")
    return value


IsoTimestamp = Annotated[AwareDatetime, BeforeValidator(_iso_text)]


class ApiKeyCreate(_In):
    role: Role = Field(default="owner", description=ROLE_DESCRIPTION)
    expires_at: IsoTimestamp | None = Field(
        default=None, description=EXPIRES_DESCRIPTION + " Must be in the future."
    )


class ApiKeyCreated(BaseModel):
    id: str
    tenant_id: str
    key: str = Field(description="The secret key. It is shown only once.")
    prefix: str = Field(description="The key's first characters, shown in key listings.")
    role: Role = Field(description=ROLE_DESCRIPTION)
    created_at: datetime
    expires_at: datetime | None = Field(description=EXPIRES_DESCRIPTION)


class ApiKey(BaseModel):
    """A key as listed: never the key itself nor its hash, only its first characters."""

    id: str
    tenant_id: str
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    role: Role = Field(description=ROLE_DESCRIPTION)
    created_at: datetime
    expires_at: datetime | None = Field(description=EXPIRES_DESCRIPTION)
    revoked_at: datetime | None = Field(description="When the key was revoked; null: it was not.")
    last_used_at: datetime | None = Field(
        description="When the key was last used, to the minute (recorded at most once a minute)."
    )


class ApiKeyPage(BaseModel):
    items: list[ApiKey]
    next_page_token: str | None


class PrivacyBudget(_In):
    epsilon: float = Field(
        strict=True, gt=0, le=100, description="Total ε allotted to the dataset."
    )
    delta: float = Field(strict=True, gt=0, lt=1, description="Total δ; must be well below 1/n.")


VALIDATION_DATASET_DESCRIPTION = (
    "A public dataset of this tenant (no budget, same number of features, same declared "
    "classes) on which jobs are scored exactly."
)


class BuiltinSource(_In):
    builtin: Literal["digits", "breast_cancer", "mnist1d"]


class DatasetCreate(_In):
    name: str = Field(min_length=1, max_length=200)
    source: BuiltinSource
    privacy_budget: PrivacyBudget | None = Field(
        description="The dataset's budget; null marks public data (no privacy needed). "
        "Required, so that forgetting it never makes private data public."
    )
    privacy_unit: Literal["record", "client"] = "record"
    validation_dataset_id: str | None = Field(
        default=None, max_length=64, description=VALIDATION_DATASET_DESCRIPTION
    )


class DatasetProblem(BaseModel):
    """Why an upload is invalid: a problem document (RFC 9457) without a status, naming the
    problem and the field, never a value from the data."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    detail: str
    field: str | None = None


class Dataset(BaseModel):
    """A registered dataset. Its counts are released metadata (PRIVACY.md): each unit's
    train/test side is a keyed hash of that unit alone, so they vary around the split's
    fraction; its classes are the declared ones, never read from the private data.

    An upload is ``validating`` until a worker has decoded and checked it (its counts are
    null until then), then ``ready`` (it takes jobs) or ``invalid`` (``problem`` says why;
    nothing of the file is kept)."""

    id: str
    name: str
    status: Literal["validating", "ready", "invalid"] = Field(
        description="validating (an upload being checked), ready, or invalid (see problem)."
    )
    problem: DatasetProblem | None = Field(
        default=None, description="Why the upload is invalid (invalid datasets only)."
    )
    source: dict[str, Any]
    task: str
    num_features: int | None = Field(description="Feature columns; null until ready.")
    num_classes: int | None = Field(
        description="Declared classes (released metadata); null until ready."
    )
    num_train: int | None = Field(
        description="Training rows (released metadata); null until ready."
    )
    num_test: int | None = Field(
        description="Held-out test rows (released metadata); null until ready."
    )
    num_clients: int | None = Field(
        description="Natural clients (distinct client ids) with training rows; null without "
        "a client column (released metadata)."
    )
    num_test_clients: int | None = Field(
        description="Natural clients wholly held out for testing (client privacy unit); "
        "null otherwise (released metadata).",
    )
    classes: list[str] = Field(
        description="The declared classes, as in schema.classes (empty until a public "
        "upload without a schema is ready)."
    )
    data_schema: DatasetSchema | None = Field(
        alias="schema",
        description="The declared schema: its classes are the released label set; null "
        "until a public upload without a schema is ready.",
    )
    privacy_budget: PrivacyBudget | None
    privacy_unit: Literal["record", "client"]
    validation_dataset_id: str | None = Field(
        default=None, description=VALIDATION_DATASET_DESCRIPTION
    )
    created_at: datetime


class DatasetPage(BaseModel):
    items: list[Dataset]
    next_page_token: str | None


class Budget(BaseModel):
    dataset_id: str
    epsilon_total: float
    delta_total: float
    epsilon_spent: float = Field(description="ε of the committed charges, composed by RDP.")
    epsilon_reserved: float = Field(description="Extra ε held by queued and running jobs.")
    epsilon_remaining: float = Field(description="ε the admission filter can still grant.")
    accounting: Literal["rdp"] = "rdp"
    admission: Literal["rdp-filter"] = "rdp-filter"
    privacy_unit: str
    grid_version: str


class LedgerEntry(BaseModel):
    id: str
    job_id: str
    kind: Literal["reserve", "commit", "release"]
    epsilon: float = Field(description="ε of this entry alone, at the dataset's δ.")
    event: dict[str, Any] = Field(description="The mechanism event that was priced.")
    rdp: dict[str, Any] = Field(description="The entry's RDP curve in integer units.")
    note: str | None
    created_at: datetime
    seq: int = Field(description="The entry's place in the dataset's hash chain: 1, 2, ...")
    prev_hash: str = Field(
        description="entry_hash of the entry before it in the chain (64 zeros for the first)."
    )
    entry_hash: str = Field(
        description="SHA-256 (hex) of the entry's content and prev_hash (docs/privacy.md, "
        "'The ledger is a hash chain')."
    )


class LedgerPage(BaseModel):
    items: list[LedgerEntry]
    next_page_token: str | None


class ExactMetrics(BaseModel):
    """Exact held-out figures of a job: for the dataset's owner only."""

    job_id: str
    metrics: ExactScores | None
    history: list[ExactScores] | None


class Job(BaseModel):
    id: str
    name: str
    dataset_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    spec: JobSpec
    progress: Progress
    metrics: Metrics | None = Field(
        description="Held-out metrics with the mechanism that released them; null until the "
        "job ends, or when an evaluation share of 0 withholds them from analysts. Owners read "
        "the exact figures at /v1/jobs/{id}/metrics/exact."
    )
    metrics_history: list[Metrics] | None = Field(
        default=None, description="Released metrics per scored round (federated jobs)."
    )
    privacy: PrivacyRecord | None = Field(
        description="The job's mechanism: its plan at admission, its outcome at the end."
    )
    error: JobError | None
    cancel_requested: bool
    attempts: int = Field(
        default=0,
        description="Times a worker claimed the job. A job whose worker was lost goes back to "
        "the queue and resumes from its last checkpoint, up to the server's limit of attempts.",
    )
    compute: int | None = Field(
        default=None,
        description="Estimated work, in sample-gradients × model parameters (expected "
        "per-example gradients of the whole job times its parameters), counted against the "
        "server's per-job and per-tenant limits; null for jobs admitted before estimates.",
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    models_deleted_at: datetime | None = Field(
        default=None,
        description="When the model files were deleted with the job's dataset; downloads and "
        "predictions then answer 410.",
    )


class JobPage(BaseModel):
    items: list[Job]
    next_page_token: str | None


class Quote(BaseModel):
    epsilon: float
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int
    fits_budget: bool
    epsilon_remaining: float | None
    max_target_epsilon: float | None = Field(
        description="When it does not fit: the largest target_epsilon of this shape that would."
    )
    compute: int = Field(
        description="Estimated work, in sample-gradients × model parameters: what the job "
        "counts against the server's per-job and per-tenant compute limits."
    )


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


class AuditEvent(BaseModel):
    """Who did what to which object, and when (append-only)."""

    id: str = Field(description="Sorts by creation time; pass it as page_token to read on.")
    tenant_id: str | None
    actor_key_id: str | None = Field(description="The API key that acted; null: the admin.")
    actor_role: Literal["owner", "analyst", "admin"]
    action: AuditAction
    object_type: ObjectType
    object_id: str | None
    detail: dict[str, Any] = Field(description="Ids, formats and counts; never data values.")
    created_at: datetime


class AuditPage(BaseModel):
    items: list[AuditEvent]
    next_page_token: str | None
