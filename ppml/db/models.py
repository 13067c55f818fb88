"""SQLAlchemy 2.0 typed models (their base and column types: ``ppml.db.base``). All SQL lives
in ``ppml.db.repositories``."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, validates

from ppml.db.base import Base, Typed, new_id, utcnow
from ppml.db.federations import Federation, FederationNode, FederationTask
from ppml.jobs.records import Artifacts, JobError, PrivacyRecord, Progress, Receipt
from ppml.privacy.evaluation import ExactMetrics, Metrics
from ppml.specs import JobSpec

__all__ = [
    "ApiKey",
    "AuditEvent",
    "Base",
    "Dataset",
    "DatasetBudget",
    "DatasetStatus",
    "Federation",
    "FederationNode",
    "FederationTask",
    "Job",
    "JobEvent",
    "JobEventKind",
    "JobStatus",
    "LedgerAcknowledgement",
    "LedgerEntry",
    "LedgerKind",
    "Tenant",
    "WebhookDelivery",
    "new_id",
    "utcnow",
]


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class DatasetStatus(StrEnum):
    """An upload is ``validating`` until the ingestion task makes it ``ready`` or ``invalid``;
    built-ins are ``ready`` at once. Only a ready dataset takes jobs."""

    VALIDATING = "validating"
    READY = "ready"
    INVALID = "invalid"


class JobEventKind(StrEnum):
    """What a job's event stream tells its followers (the ``end`` event is the job itself)."""

    STATUS = "status"  # {"status": ...}
    PROGRESS = "progress"  # the job's progress record
    SCORES = "scores"  # exact held-out figures (ExactScores): streamed to owner keys only


class LedgerKind(StrEnum):
    RESERVE = "reserve"
    COMMIT = "commit"
    RELEASE = "release"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When a worker last claimed one of its jobs: the tenant served longest ago goes first
    # (ppml.jobs.lifecycle.claim_next).
    last_claim_at: Mapped[datetime | None]
    # Jobs ever admitted for it and their summed compute estimates, or more: each admission
    # adds its batch's under the row's lock, before deciding (ppml.services.rooms). How much
    # its queued and running jobs can have grown since they were last counted. The compute
    # sum stops at ADMITTED_COMPUTE_CAP (from there on, every admission counts afresh).
    admitted_jobs: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    admitted_compute: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


ADMITTED_COMPUTE_CAP = 2**61


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    # "owner" (registers budgeted data, sees exact figures of it) or "analyst" (PRIVACY.md).
    role: Mapped[str] = mapped_column(String(16), default="owner")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]  # refused from then on; None: never expires
    revoked_at: Mapped[datetime | None]  # refused from then on; a revoked key stays revoked
    # Moved at most once a minute per key (ppml.services.tenants.LAST_USED_EVERY), so a busy
    # key costs no write per request.
    last_used_at: Mapped[datetime | None]


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (
        Index("ix_datasets_tenant_status", "tenant_id", "status"),
        Index("ix_datasets_tenant_fingerprint", "tenant_id", "fingerprint"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[dict[str, Any]]
    task: Mapped[str] = mapped_column(String(32), default="classification")
    num_features: Mapped[int] = mapped_column(Integer)
    num_classes: Mapped[int] = mapped_column(Integer)
    num_train: Mapped[int] = mapped_column(Integer)
    num_test: Mapped[int] = mapped_column(Integer)
    num_clients: Mapped[int | None] = mapped_column(Integer)  # natural clients of the train rows
    num_test_clients: Mapped[int | None] = mapped_column(Integer)  # clients wholly held out
    classes: Mapped[dict[str, Any]]
    # The declared schema ({"classes": [...], "input_shape": [...] or absent}): what is
    # released about the data's shape.
    data_schema: Mapped[dict[str, Any] | None]
    # DP standardisation statistics (ppml.datasets.statistics.DatasetStatistics): charged
    # once on the ledger as a dataset-level entry, released to every role, reused by jobs.
    statistics: Mapped[dict[str, Any] | None]
    # Secret key of the record-independent split and partitions; never released. Stored
    # sealed under the data key ("v1:<key id>:<base64>", ppml.datasets.keys.seal_secret);
    # rows written before sealing hold the plain hex until the next start seals them.
    split_secret: Mapped[str | None] = mapped_column(Text)
    # A public dataset whose rows score jobs exactly and for free (owner-declared).
    validation_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    privacy_unit: Mapped[str] = mapped_column(String(16), default="record")
    epsilon_total: Mapped[float | None] = mapped_column(Float)
    delta_total: Mapped[float | None] = mapped_column(Float)
    storage_key: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Ingestion (ppml.services.ingestion). While validating, the counts and classes above
    # hold placeholders (0, []) that the API shows as null; nothing reads them before ready.
    status: Mapped[str] = mapped_column(
        String(16), default=DatasetStatus.READY, server_default=DatasetStatus.READY
    )
    # Why an upload is invalid: {"code", "title", "detail", "field", ...}, never data values.
    problem: Mapped[dict[str, Any] | None]
    # What the ingestion task needs (never released): the stored upload's key, its format,
    # the target and client columns. Cleared once the dataset is ready or invalid.
    ingest: Mapped[dict[str, Any] | None]
    ingest_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    ingest_sent_at: Mapped[datetime | None]  # when the ingestion task was last sent
    ingest_started_at: Mapped[datetime | None]  # when the current attempt began
    # Bytes this dataset keeps in the store (the upload while validating, then its arrays),
    # summed per tenant against limits.max_tenant_storage_bytes.
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Keyed hash of the normalised rows, row order ignored (ppml.services.fingerprints), set
    # once the rows are known (ready): a budgeted registration of the same rows is refused.
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    # Deleted by its owner (ppml.services.deletion): files gone, no longer listed or usable;
    # its budget row, ledger entries, jobs and audit events are kept.
    deleted_at: Mapped[datetime | None]
    # A federation's backing dataset (ppml.db.federations): no files, never listed.
    federation_backing: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")

    def __init__(self, **kwargs: Any) -> None:
        # Column defaults apply at INSERT; a row built in Python is ready unless told.
        kwargs.setdefault("status", DatasetStatus.READY)
        super().__init__(**kwargs)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The shape of one row the schema declares (``[1, 8, 8]``), or None."""
        shape = (self.data_schema or {}).get("input_shape")
        return None if shape is None else tuple(int(size) for size in shape)


class DatasetBudget(Base):
    """The lockable budget row and the cached fold of the dataset's ledger entries."""

    __tablename__ = "dataset_budgets"

    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), primary_key=True)
    epsilon_total: Mapped[float] = mapped_column(Float)
    delta_total: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(16))
    grid_version: Mapped[str] = mapped_column(String(16))
    # The admission filter (ppml.privacy.filters), fixed when the budget is opened: budgets
    # charged before filters were versioned keep "uniform-v1".
    admission_filter: Mapped[str] = mapped_column(
        String(32), default="uniform-v1", server_default="uniform-v1"
    )
    filter_anchor: Mapped[float | None] = mapped_column(Float, nullable=True)
    committed: Mapped[dict[str, Any]]  # {"rdp": [int, ...]} in accounting units
    reserved: Mapped[dict[str, Any]]
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        # A tenant's active jobs (admission), and its oldest queued one (a fair claim)
        Index("ix_jobs_tenant_status_queued_at", "tenant_id", "status", "queued_at"),
        Index("ix_jobs_status_queued_at", "status", "queued_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[JobSpec] = mapped_column(Typed(JobSpec))
    # Set only by ppml.jobs.lifecycle, through its transition table.
    status: Mapped[str] = mapped_column(String(16))
    progress: Mapped[Progress] = mapped_column(Typed(Progress))
    metrics: Mapped[Metrics | None] = mapped_column(Typed(Metrics))  # released
    # Released metrics per scored round of a federated job.
    metrics_history: Mapped[list[Metrics] | None] = mapped_column(Typed(list[Metrics]))
    # Exact held-out figures: the dataset's owner only.
    exact_metrics: Mapped[ExactMetrics | None] = mapped_column(Typed(ExactMetrics))
    # The plan at admission, the outcome at the end.
    privacy: Mapped[PrivacyRecord | None] = mapped_column(Typed(PrivacyRecord))
    error: Mapped[JobError | None] = mapped_column(Typed(JobError))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims, preempted ones included
    # Claims that ended in a preemption (the job yielded its worker to another tenant's): they
    # do not count toward the worker's max_attempts.
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When it last entered ``queued`` (admitted, re-queued, preempted): its place in line.
    queued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    # Estimated work, in sample-gradients × parameters (ppml.services.pricing); None for jobs
    # admitted before estimates existed.
    compute: Mapped[int | None] = mapped_column(BigInteger)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    data_touched: Mapped[bool] = mapped_column(Boolean, default=False)
    steps_done: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]  # last progress report; None = progress unknown
    enqueued_at: Mapped[datetime | None]
    artifacts: Mapped[Artifacts | None] = mapped_column(Typed(Artifacts))  # published files
    receipt: Mapped[Receipt | None] = mapped_column(Typed(Receipt))  # of the published model
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The seq of the job's newest event (0: none yet): incremented in the statement that
    # records the event, so it is allocated under the row's lock (see JobEvent).
    last_event_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the model files were deleted with the job's dataset (DELETE ... ?delete_models):
    # downloads and predictions then answer 410; ``artifacts`` keeps their digests.
    models_deleted_at: Mapped[datetime | None]

    @validates(
        "spec",
        "progress",
        "metrics",
        "metrics_history",
        "exact_metrics",
        "privacy",
        "error",
        "artifacts",
        "receipt",
    )
    def _typed(self, key: str, value: Any) -> Any:
        column_type = self.__table__.c[key].type
        assert isinstance(column_type, Typed)
        return column_type.coerce(value)


class LedgerEntry(Base):
    """Append-only: one RESERVE, at most one COMMIT and one RELEASE per job.

    Each dataset's entries form a hash chain (``ppml.privacy.chain``): ``seq`` numbers them
    1, 2, ... per dataset, ``prev_hash`` is the ``entry_hash`` of entry ``seq - 1`` (zeros for
    the first) and ``entry_hash`` covers the entry's content and that link.
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (UniqueConstraint("dataset_id", "seq", name="uq_ledger_entries_dataset_seq"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    # None: a dataset-level charge (its standardisation statistics), tied to no job.
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str] = mapped_column(String(80), unique=True)
    rdp: Mapped[dict[str, Any]]  # {"grid": version, "units": [int, ...]}
    event: Mapped[dict[str, Any]]
    epsilon: Mapped[float] = mapped_column(Float)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    seq: Mapped[int] = mapped_column(Integer)
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))


class LedgerAcknowledgement(Base):
    """An operator's acknowledgement that a dataset's ledger is behind its signed chain head
    (``ppml db acknowledge-rollback``): the head file then moves back to the database's head.

    No foreign key: the record of the event outlives whatever it names.
    """

    __tablename__ = "ledger_acknowledgements"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(String(40), index=True)
    acknowledged_at: Mapped[datetime] = mapped_column(default=utcnow)
    acknowledged_by: Mapped[str] = mapped_column(String(200))
    # The head the signed file held (None: the file could not be trusted, or had none) ...
    from_seq: Mapped[int | None] = mapped_column(Integer)
    from_head: Mapped[str | None] = mapped_column(String(64))
    # ... and the database's head it was reset to (seq 0: no entries).
    to_seq: Mapped[int] = mapped_column(Integer)
    to_head: Mapped[str] = mapped_column(String(64))
    note: Mapped[str] = mapped_column(Text)


class JobEvent(Base):
    """Append-only: what the job's event stream sends, numbered 1, 2, ... per job.

    Written in the transaction that changes the job row (status, progress), so the two never
    disagree; the seq is the job row's ``last_event_seq``. ``status`` and ``progress`` events
    carry only what the job resource shows analysts; ``scores`` events carry exact held-out
    figures, which the stream and the metrics history give to owner keys only.
    """

    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Append-only: who (key id and role; the admin token has no key) did what to which
    object, and when. Written in the transaction of the action it records
    (``ppml.services.audit``); nothing updates or deletes a row."""

    __tablename__ = "audit_events"
    # Ids sort by creation time, so (tenant, id) serves a tenant's trail in time order.
    __table_args__ = (
        Index("ix_audit_events_tenant_id_id", "tenant_id", "id"),
        Index("ix_audit_events_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # None: an admin action on no tenant.
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"))
    actor_key_id: Mapped[str | None] = mapped_column(String(40))  # None: the admin token
    actor_role: Mapped[str] = mapped_column(String(16))  # owner, analyst or admin
    action: Mapped[str] = mapped_column(String(32))
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(64), index=True)
    detail: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """The outbox of a job's webhook: written in the transaction that ends the job
    (``ppml.jobs.lifecycle.finish``), delivered by the workers (``ppml.jobs.webhooks``).

    ``body`` is the exact JSON sent, fixed at the end so that every retry sends the same bytes
    (signed afresh with the time of the attempt). One per job: a job ends once.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    url: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(String(200))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
