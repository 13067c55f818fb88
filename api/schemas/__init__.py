"""Request and response bodies of the HTTP contract (``shared/API.md``), one module per
resource; everything is importable from ``api.schemas``."""

from __future__ import annotations

from api.schemas.common import FieldProblem, Problem
from api.schemas.datasets import (
    Budget,
    Dataset,
    DatasetCreate,
    DatasetPage,
    DatasetProblem,
    LedgerEntry,
    LedgerPage,
    PrivacyBudget,
)
from api.schemas.jobs import (
    ExactMetrics,
    Job,
    JobPage,
    JobStatusFilter,
    MetricsHistory,
    MetricsPoint,
    Quote,
)
from api.schemas.models import (
    ModelArchitecture,
    ModelCard,
    PredictRequest,
    PredictResponse,
    PrivatePredictResponse,
    ReceiptPrivacy,
    SignedReceiptFile,
    SigningKey,
    SigningKeys,
)
from api.schemas.tenants import (
    ApiKey,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPage,
    AuditEvent,
    AuditPage,
    Tenant,
    TenantCreate,
    TenantPage,
)
from ppml.datasets.schema import DatasetSchema
from ppml.jobs.records import Progress
from ppml.privacy.evaluation import ExactScores, Metrics, MetricsRelease
from ppml.specs import JobSpec

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
    "FieldProblem",
    "Job",
    "JobPage",
    "JobSpec",
    "JobStatusFilter",
    "LedgerEntry",
    "LedgerPage",
    "Metrics",
    "MetricsHistory",
    "MetricsPoint",
    "MetricsRelease",
    "ModelArchitecture",
    "ModelCard",
    "PredictRequest",
    "PredictResponse",
    "PrivacyBudget",
    "PrivatePredictResponse",
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
