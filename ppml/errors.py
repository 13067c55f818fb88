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
