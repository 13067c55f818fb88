"""The audit trail of the caller's tenant (owner keys), as pages or as JSON lines.

The admin reads any tenant's trail at ``GET /v1/tenants/{id}/audit`` (``api.routes.tenants``),
through the same :func:`audit_answer`. No route updates or deletes an event.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import StreamingResponse

from api.deps import DatabaseDep, ReposDep, RequireOwner
from api.routes.common import DEFAULT_PAGE_SIZE, PageSize, PageToken, Router, errors
from api.schemas import AuditEvent, AuditPage
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.services import audit

__all__ = ["AUDIT_RESPONSES", "JSONL_MEDIA_TYPE", "audit_answer", "router"]

router = Router(prefix="/v1/audit", tags=["audit"])

JSONL_MEDIA_TYPE = "application/x-ndjson"


class AuditActionFilter(StrEnum):
    """An audit action to filter by: ``ppml.services.audit.AuditAction`` as a named schema,
    so generated clients name it (a test keeps the two lists equal)."""

    TENANT_CREATE = "tenant.create"
    KEY_CREATE = "key.create"
    KEY_REVOKE = "key.revoke"
    DATASET_REGISTER = "dataset.register"
    DATASET_UPLOAD = "dataset.upload"
    DATASET_DELETE = "dataset.delete"
    DATASET_STATISTICS = "dataset.statistics"
    JOB_SUBMIT = "job.submit"
    JOB_CANCEL = "job.cancel"
    MODEL_DOWNLOAD = "model.download"
    MODEL_PREDICT = "model.predict"
    FEDERATION_CREATE = "federation.create"
    NODE_INVITE = "node.invite"
    NODE_REVOKE = "node.revoke"


class AuditFormat(StrEnum):
    """How an audit trail is answered: a page (json) or every event as JSON lines."""

    JSON = "json"
    JSONL = "jsonl"


ActionFilter = Annotated[AuditActionFilter | None, Query(description="Only events of this action.")]
ObjectFilter = Annotated[
    str | None, Query(max_length=64, description="Only events about this object id.")
]
Format = Annotated[
    AuditFormat | None,
    Query(
        description="json: a page; jsonl: every matching event after page_token, one JSON "
        "object per line (application/x-ndjson), for export. Without it, "
        "`Accept: application/x-ndjson` asks for JSON lines."
    ),
]

AUDIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A page of events, oldest first; or, for `format=jsonl`, every "
        "matching event as JSON lines.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/AuditPage"}},
            JSONL_MEDIA_TYPE: {"schema": {"type": "string"}},
        },
    },
}


def _wants_lines(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "jsonl"
    return JSONL_MEDIA_TYPE in request.headers.get("accept", "")


def _lines(
    db: Database, tenant_id: str, action: str | None, object_id: str | None, after: str | None
) -> Iterator[bytes]:
    for rows in audit.events_after(db, tenant_id, action=action, object_id=object_id, after=after):
        events = (AuditEvent.model_validate(r, from_attributes=True) for r in rows)
        yield b"".join(e.model_dump_json().encode() + b"\n" for e in events)


def audit_answer(
    request: Request,
    repos: Repositories,
    db: Database,
    tenant_id: str,
    *,
    action: str | None,
    object_id: str | None,
    fmt: str | None,
    page_size: int,
    page_token: str | None,
) -> AuditPage | StreamingResponse:
    """One page of the tenant's trail, or all of it after ``page_token`` as JSON lines."""
    if _wants_lines(request, fmt):
        lines = _lines(db, tenant_id, action, object_id, page_token)
        return StreamingResponse(lines, media_type=JSONL_MEDIA_TYPE)
    rows, token = audit.page(
        repos,
        tenant_id,
        action=action,
        object_id=object_id,
        page_size=page_size,
        page_token=page_token,
    )
    items = [AuditEvent.model_validate(r, from_attributes=True) for r in rows]
    return AuditPage(items=items, next_page_token=token)


@router.get(
    "",
    operation_id="list_audit_events",
    responses={**errors(403), **AUDIT_RESPONSES},
    response_model=AuditPage,
)
def list_audit_events(
    owner: RequireOwner,
    request: Request,
    repos: ReposDep,
    db: DatabaseDep,
    action: ActionFilter = None,
    object_id: ObjectFilter = None,
    format: Format = None,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> Any:
    """The audit trail of the caller's tenant (owner keys; analysts get 403), oldest first:
    who (key id and role) registered, uploaded or deleted data, submitted or cancelled jobs,
    downloaded models, predicted, and created or revoked keys, and when.

    Pass the last id read as ``page_token`` to read on, or to follow the trail.
    ``format=jsonl`` (or ``Accept: application/x-ndjson``) streams every matching event after
    ``page_token`` as JSON lines, for export."""
    return audit_answer(
        request,
        repos,
        db,
        owner.tenant_id,
        action=action,
        object_id=object_id,
        fmt=format,
        page_size=page_size,
        page_token=page_token,
    )
