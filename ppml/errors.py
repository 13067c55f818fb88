"""Domain errors. They know nothing of HTTP; ``api.errors`` renders them as problem+json."""

from __future__ import annotations

from typing import Any


class PPMLError(Exception):
    """Base class of every error a user can cause.

    ``code`` becomes the last segment of the problem ``type`` URI; ``extra`` holds
    extension members of the problem document (never data values).
    """

    code = "error"
    title = "Error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(PPMLError):
    code = "not-found"
    title = "Not found"


class InvalidInput(PPMLError):
    """A request that is well-formed JSON but makes no sense (422). ``field`` names the culprit."""

    code = "invalid-input"
    title = "Invalid input"

    def __init__(self, detail: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.field = field


class MalformedFile(InvalidInput):
    code = "malformed-file"
    title = "Malformed file"


class PayloadTooLarge(PPMLError):
    code = "payload-too-large"
    title = "Payload too large"


class Conflict(PPMLError):
    code = "conflict"
    title = "Conflict"


class BudgetExceeded(Conflict):
    code = "budget-exceeded"
    title = "Privacy budget exceeded"


class PrivacyRequired(Conflict):
    code = "privacy-required"
    title = "Differential privacy required"


class PrivacyUnitMismatch(Conflict):
    """A mechanism that protects another unit than the budget it would be charged to."""

    code = "privacy-unit-mismatch"
    title = "Privacy unit mismatch"


class StorageQuotaExceeded(Conflict):
    """The tenant's stored datasets and this upload would pass its storage quota."""

    code = "storage-quota-exceeded"
    title = "Storage quota exceeded"


class DatasetNotReady(Conflict):
    """A job or a reference names a dataset that is still validating, or invalid."""

    code = "dataset-not-ready"
    title = "Dataset not ready"


class LedgerRollback(Conflict):
    """The dataset's ledger in the database is behind the chain head signed outside it (entries
    deleted, an older copy restored): no job is admitted on it until an operator acknowledges
    (``ppml db acknowledge-rollback``)."""

    code = "ledger-rollback"
    title = "Ledger rolled back"


class LedgerHeadsInvalid(Conflict):
    """The signed file of chain heads does not verify (edited, or signed by an unknown key):
    no job is admitted on any dataset until an operator rebuilds it."""

    code = "ledger-heads-invalid"
    title = "Ledger head file invalid"


class DatasetDeleted(NotFound):
    """The tenant deleted this dataset: it is no longer listed or usable (its ledger, budget
    and audit trail are kept)."""

    code = "dataset-deleted"
    title = "Dataset deleted"


class DatasetInUse(Conflict):
    """A dataset that queued or running jobs, or another dataset, still need."""

    code = "dataset-in-use"
    title = "Dataset in use"


class DatasetAlreadyRegistered(Conflict):
    """Rows already registered with a budget (the same content fingerprint), deleted or not."""

    code = "dataset-already-registered"
    title = "Dataset already registered"


class Gone(PPMLError):
    """Something that existed and was deleted on purpose (410)."""

    code = "gone"
    title = "Gone"


class JobNotCancellable(Conflict):
    code = "job-not-cancellable"
    title = "Job is already finished"


class IdempotencyMismatch(InvalidInput):
    code = "idempotency-key-reused"
    title = "Idempotency key reused with another body"


class Unauthorized(PPMLError):
    code = "unauthorized"
    title = "Unauthorized"


class Forbidden(PPMLError):
    code = "forbidden"
    title = "Forbidden"


class TooManyRequests(PPMLError):
    code = "too-many-requests"
    title = "Too many requests"


class SchemaMismatch(InvalidInput):
    """A federation node whose data does not match the federation's schema (it is refused)."""

    code = "schema-mismatch"
    title = "Schema mismatch"


class StaleUpdate(Conflict):
    """An update or a weights download for a task that is no longer open (its round closed,
    the node was revoked, or it was answered already)."""

    code = "stale-task"
    title = "Task no longer open"
