"""Admin routes: tenants and their API keys."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Path, Request, Response

from api.deps import AdminAuth, DatabaseDep, ReposDep
from api.routes.audit import AUDIT_RESPONSES, ActionFilter, Format, ObjectFilter, audit_answer
from api.routes.common import DEFAULT_PAGE_SIZE, PageSize, PageToken, Router, errors
from api.routes.keys import key_page
from api.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPage,
    AuditPage,
    Tenant,
    TenantCreate,
    TenantPage,
)
from ppml.errors import NotFound
from ppml.services import tenants

router = Router(prefix="/v1/tenants", tags=["tenants"])


@router.post(
    "", status_code=201, operation_id="create_tenant", responses=errors(409), response_model=Tenant
)
def create_tenant(body: TenantCreate, _admin: AdminAuth, repos: ReposDep) -> Tenant:
    """Create a tenant (admin token)."""
    row = tenants.create_tenant(repos, name=body.name)
    return Tenant.model_validate(row, from_attributes=True)


@router.get("", operation_id="list_tenants", responses=errors(), response_model=TenantPage)
def list_tenants(
    _admin: AdminAuth,
    repos: ReposDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> TenantPage:
    """List tenants (admin token)."""
    rows, token = repos.list_tenants(page_size=page_size, page_token=page_token)
    items = [Tenant.model_validate(r, from_attributes=True) for r in rows]
    return TenantPage(items=items, next_page_token=token)


@router.post(
    "/{tenant_id}/api-keys",
    status_code=201,
    operation_id="create_api_key",
    responses=errors(404),
    response_model=ApiKeyCreated,
)
def create_api_key(
    tenant_id: Annotated[str, Path(max_length=64)],
    _admin: AdminAuth,
    repos: ReposDep,
    # No body is an owner's key, as before roles existed. A default rather than ``| None``:
    # generated clients then send no body when none is given (not a JSON null).
    body: Annotated[ApiKeyCreate, Body(default_factory=ApiKeyCreate)],
    response: Response,
) -> ApiKeyCreated:
    """Create an owner or analyst API key for a tenant (admin token). The key is shown once.

    Without a body the key is an owner's.
    """
    response.headers["Cache-Control"] = "no-store"  # a secret: no cache may keep it
    row, key = tenants.create_api_key(
        repos, tenant_id=tenant_id, role=body.role, expires_at=body.expires_at
    )
    return ApiKeyCreated(
        id=row.id,
        tenant_id=row.tenant_id,
        key=key,
        prefix=row.prefix,
        role=body.role,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )


@router.get(
    "/{tenant_id}/api-keys",
    operation_id="list_api_keys",
    responses=errors(404),
    response_model=ApiKeyPage,
)
def list_api_keys(
    tenant_id: Annotated[str, Path(max_length=64)],
    _admin: AdminAuth,
    repos: ReposDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> ApiKeyPage:
    """List a tenant's API keys, revoked and expired ones included (admin token).

    Keys are never shown again after their creation: only their first characters.
    """
    return key_page(repos, tenant_id, page_size=page_size, page_token=page_token)


@router.delete(
    "/{tenant_id}/api-keys/{key_id}",
    status_code=204,
    operation_id="revoke_api_key",
    responses=errors(404),
)
def revoke_api_key(
    tenant_id: Annotated[str, Path(max_length=64)],
    key_id: Annotated[str, Path(max_length=64)],
    _admin: AdminAuth,
    repos: ReposDep,
) -> Response:
    """Revoke a tenant's API key (admin token); every API process refuses it within a second.

    Revoking a revoked key changes nothing. The key stays listed, with ``revoked_at``.
    """
    tenants.revoke_api_key(repos, tenant_id=tenant_id, key_id=key_id)
    return Response(status_code=204)


@router.get(
    "/{tenant_id}/audit",
    operation_id="list_tenant_audit_events",
    responses={**errors(404), **AUDIT_RESPONSES},
    response_model=AuditPage,
)
def list_tenant_audit_events(
    tenant_id: Annotated[str, Path(max_length=64)],
    _admin: AdminAuth,
    request: Request,
    repos: ReposDep,
    db: DatabaseDep,
    action: ActionFilter = None,
    object_id: ObjectFilter = None,
    format: Format = None,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> Any:
    """A tenant's audit trail, oldest first (admin token); ``format=jsonl`` (or
    ``Accept: application/x-ndjson``) streams it as JSON lines for export."""
    if repos.tenant(tenant_id) is None:
        raise NotFound("tenant not found")
    return audit_answer(
        request,
        repos,
        db,
        tenant_id,
        action=action,
        object_id=object_id,
        fmt=format,
        page_size=page_size,
        page_token=page_token,
    )
