"""One typed settings object, read from ``PPML_*`` environment variables."""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "EventStreams",
    "Limits",
    "Settings",
    "Webhooks",
    "WorkerSettings",
    "get_settings",
]


class Limits(BaseModel):
    """Caps on what one request or job may ask for (all reported in 4xx problem bodies)."""

    max_upload_bytes: int = 256 * 1024 * 1024  # a multipart POST /v1/datasets/upload
    # Every other request body (JSON): refused with 413 from its Content-Length or once the
    # streamed bytes pass it, before anything parses it. Predictions carry rows of features.
    max_json_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_predict_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_rows: int = 1_000_000
    max_columns: int = 10_000
    # What an upload may decode to, estimated from its headers (rows × columns × item size)
    # before anything decodes it: a small compressed file can decode to gigabytes.
    max_decoded_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024)
    # Stored bytes of one tenant's datasets (uploads being validated count at their size).
    max_tenant_storage_bytes: int = Field(default=10 * 1024**3, ge=1024 * 1024)
    max_classes: int = 1_000
    max_epochs: int = 1_000
    max_sample_epochs: int = 200_000_000  # epochs × training records
    max_parameters: int = 50_000_000
    max_active_jobs_per_tenant: int = 256  # queued + running
    # Estimated compute, in sample-gradients × model parameters (ppml.services.pricing): one
    # sample-gradient is a forward and backward pass of one example, about 6 FLOPs per
    # parameter. Per job (422 at quote and submit), and summed over a tenant's queued and
    # running jobs (429 at submit). The largest job of the tests and benchmarks is ~2e10
    # (an MLP 40-256-256-10, 60 epochs over 4,000 records); the limits allow 2,500 of them.
    max_job_compute: int = Field(default=5 * 10**13, ge=1, le=2**62)
    max_tenant_compute: int = Field(default=2 * 10**14, ge=1, le=2**62)
    # POST /v1/jobs/quote per tenant and API process: a token bucket refilled at this rate
    # that holds at most quote_burst tokens; an empty bucket answers 429 with Retry-After.
    quotes_per_second: float = Field(default=5.0, gt=0)
    quote_burst: int = Field(default=30, ge=1)
    max_predict_rows: int = 4096
    # GPUs one job may ask for (resources.gpus; data-parallel DP-SGD): set it to what every
    # worker has, since any worker may claim the job. A CPU-only worker runs that many
    # processes instead. Above it: 422.
    max_job_gpus: int = Field(default=1, ge=1, le=64)
    model_cache_size: int = 32  # loaded ONNX sessions kept by each API process


class EventStreams(BaseModel):
    """How ``GET /v1/jobs/{id}/events`` serves its followers (limits per API process)."""

    poll_s: float = Field(default=0.5, gt=0, le=5)  # how often a stream with news polls
    idle_poll_s: float = Field(default=2.0, gt=0, le=10)  # ... and a quiet one, at the slowest
    keepalive_s: float = Field(default=10.0, gt=0, le=15)  # a comment when nothing else was sent
    # A stream ends after this long; the client reconnects with Last-Event-ID and misses nothing.
    max_duration_s: float = Field(default=3600.0, gt=0)
    retry_ms: int = Field(default=3000, ge=0)  # the reconnection delay clients are told
    max_per_tenant: int = Field(default=20, ge=1)  # open streams; more answer 429
    retry_after_s: int = Field(default=5, ge=1)  # what that 429 asks clients to wait


class WorkerSettings(BaseModel):
    """How workers run jobs and keep their rows honest."""

    lease_seconds: int = 60
    report_every_steps: int = 50
    # Claims of one job (counted in its row). A job whose lease expires is re-queued and
    # resumes from its last checkpoint until it has been claimed this often; then it fails
    # with ``worker_lost`` (so a job that kills its worker cannot loop forever).
    max_attempts: int = Field(default=3, ge=1)
    job_time_limit_s: int = 6 * 3600
    queue: str = "training"
    reaper_interval_s: float = 15.0
    # Re-send a queued job's message after this long: a broker restart without persistence
    # loses messages; duplicates are harmless (only one delivery can claim the job).
    requeue_after_s: float = 300.0
    # An upload's validation holds the dataset this long: a duplicate delivery meanwhile
    # leaves it alone, and only after it may a re-sent task try again (a worker lost).
    ingest_lease_s: float = Field(default=900.0, gt=0)
    # Fair sharing of workers between tenants (ppml.jobs.lifecycle): a job that has held its
    # worker this long yields it at its next report when another tenant's job has waited
    # ``preempt_after_wait_s`` (long enough for an idle worker to have claimed it). It goes
    # back to ``queued`` and resumes from its checkpoint, charged once. None: never preempt.
    time_slice_s: float | None = Field(default=600.0, gt=0)
    preempt_after_wait_s: float = Field(default=5.0, ge=0)
    # CPU threads per training process (None: torch's default, one per core). On machines
    # shared with the API or other workers, fewer threads avoid busy-waiting on each other.
    torch_threads: int | None = None


class Webhooks(BaseModel):
    """How workers deliver the signed events of jobs that name a ``webhook_url``."""

    # Private, loopback, link-local and other non-public addresses are refused unless this is
    # set (a webhook must not reach the service's own network); tests and single-host setups
    # set it, PPML_WEBHOOKS__ALLOW_PRIVATE_ADDRESSES=true.
    allow_private_addresses: bool = False
    timeout_s: float = Field(default=5.0, gt=0, le=30)  # per attempt; redirects not followed
    max_attempts: int = Field(default=8, ge=1, le=20)  # then the delivery is marked failed
    backoff_s: float = Field(default=2.0, gt=0)  # the first retry's delay, doubled each time
    max_backoff_s: float = Field(default=600.0, gt=0)
    poll_s: float = Field(default=1.0, gt=0, le=60)  # how often each worker looks for due ones


class Settings(BaseSettings):
    """Service configuration. Nested groups use ``__``: ``PPML_LIMITS__MAX_ROWS=10``."""

    model_config = SettingsConfigDict(env_prefix="PPML_", env_nested_delimiter="__")

    environment: Literal["local", "production"] = "local"
    # Logs of the API processes and workers: one JSON object per line (request_id, job_id;
    # ppml.telemetry), or plain text for a terminal.
    log_format: Literal["json", "text"] = "json"
    data_dir: Path = Path(".ppml")
    # Where datasets, models, checkpoints and the signing keys live (ppml.storage): unset, the
    # data dir; ``s3://bucket/prefix``, an S3-compatible object store, which API processes and
    # workers on other machines share (credentials from boto3's chain: AWS_ACCESS_KEY_ID, ...).
    storage_url: str | None = None
    s3_endpoint_url: str | None = None  # MinIO, SeaweedFS, ...: e.g. http://minio:9000
    database_url: str | None = None
    broker_url: str | None = None
    admin_token: str | None = Field(default=None, repr=False)
    # The data key that seals datasets, uploads, checkpoints and per-dataset secrets at rest
    # (ppml.trust.sealing): the base64 of 32 random bytes. Local use generates one into the
    # data dir; production requires it. Retired keys (comma-separated) still open what they
    # sealed. Losing a key loses what it sealed.
    encryption_key: SecretStr | None = Field(default=None, repr=False)
    encryption_old_keys: SecretStr | None = Field(default=None, repr=False)
    # The signed heads of the ledger's hash chains (ppml.privacy.heads), kept outside the
    # database so that a restored backup is detected. Default: <data dir>/ledger-heads.json.
    # Every API process and worker must see the same file.
    ledger_heads_file: Path | None = None
    limits: Limits = Limits()
    worker: WorkerSettings = WorkerSettings()
    events: EventStreams = EventStreams()
    webhooks: Webhooks = Webhooks()

    @field_validator("encryption_key", "encryption_old_keys")
    @classmethod
    def _keys_are_32_bytes(cls, value: SecretStr | None) -> SecretStr | None:
        from ppml.trust.sealing import decode_key

        for key in _split_keys(value):
            decode_key(key)  # a clear error at startup, not at the first sealed file
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_is_s3(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("s3://") or len(value) <= len("s3://")):
            raise ValueError("PPML_STORAGE_URL must be s3://bucket[/prefix] (unset: the data dir)")
        return value

    @model_validator(mode="after")
    def _shared_store_needs_a_shared_key(self) -> Settings:
        # A key generated into each machine's own data dir would seal what the others
        # cannot open: the first shared dataset or checkpoint would fail elsewhere.
        if self.storage_url and self.encryption_key is None:
            raise ValueError(
                "PPML_STORAGE_URL needs PPML_ENCRYPTION_KEY (base64 of 32 random bytes), the "
                "same for the API and every worker that share the store"
            )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production":
            if not self.admin_token or len(self.admin_token) < 16:
                raise ValueError("production needs PPML_ADMIN_TOKEN of at least 16 characters")
            if self.encryption_key is None:
                raise ValueError(
                    "production needs PPML_ENCRYPTION_KEY (base64 of 32 random bytes), the "
                    "same for the API and every worker"
                )
            if self.database_url is None or self.database_url.startswith("sqlite"):
                raise ValueError("production needs PPML_DATABASE_URL on PostgreSQL")
            if self.broker_url is None:
                raise ValueError("production needs PPML_BROKER_URL (Redis)")
        return self

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file under the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ppml.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        """The broker URL, defaulting to kombu's filesystem transport (no server)."""
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        """Folder of the serverless filesystem broker."""
        return (self.data_dir / "broker").resolve()

    @property
    def signing_keys_dir(self) -> Path:
        """Folder of the Ed25519 signing keys (ppml.trust.keys); generated on first use. With
        ``storage_url`` set, the keyring lives in the object store instead."""
        return (self.data_dir / "keys").resolve()

    @property
    def ledger_heads_path(self) -> Path:
        """The signed file of the ledger's chain heads (``ppml.privacy.heads``)."""
        return (self.ledger_heads_file or self.data_dir / "ledger-heads.json").resolve()

    @property
    def datasets_dir(self) -> Path:
        return (self.data_dir / "datasets").resolve()

    @property
    def artifacts_dir(self) -> Path:
        return (self.data_dir / "artifacts").resolve()

    def ensure_admin_token(self) -> str:
        """The admin token; in local use, one is generated once and kept under the data dir."""
        if self.admin_token:
            return self.admin_token
        path = self.data_dir / "admin_token"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        self.admin_token = path.read_text().strip()
        return self.admin_token

    def ensure_encryption_key(self) -> str:
        """The active data key (base64); in local use, one is generated once into the data
        dir (``encryption_key``, mode 0600) and shared by every process using that dir."""
        if self.encryption_key is not None:
            return self.encryption_key.get_secret_value()
        path = self.data_dir / "encryption_key"
        if not path.exists():
            from ppml.trust.sealing import new_data_key

            self.data_dir.mkdir(parents=True, exist_ok=True)
            # Written aside, then linked into place: of two processes starting at once, one
            # key wins, and neither overwrites the other's (which may already seal a file).
            staged = self.data_dir / f".encryption_key.{secrets.token_hex(8)}"
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(new_data_key())
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(staged, path)
            except FileExistsError:
                pass
            finally:
                staged.unlink()
        self.encryption_key = SecretStr(path.read_text().strip())
        return self.encryption_key.get_secret_value()

    def old_encryption_keys(self) -> list[str]:
        """Retired data keys (base64) that still open what they sealed."""
        return _split_keys(self.encryption_old_keys)


def _split_keys(value: SecretStr | None) -> list[str]:
    if value is None:
        return []
    return [key.strip() for key in value.get_secret_value().split(",") if key.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests build their own ``Settings``)."""
    return Settings()
