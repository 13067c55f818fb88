"""A tenant's own API keys, for its owner keys: list and revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Response

from api.deps import CurrentPrincipal, ReposDep, RequireOwner
from api.routes.common import DEFAULT_PAGE_SIZE, PageSize, PageToken, Router, errors
from api.schemas import ApiKey, ApiKeyPage
from ppml.db.repositories import Repositories
from ppml.services import tenants

router = Router(prefix="/v1/api-keys", tags=["keys"])


@router.get("", operation_id="list_own_api_keys", responses=errors(403), response_model=ApiKeyPage)
def list_own_api_keys(
    owner: RequireOwner,
    repos: ReposDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> ApiKeyPage:
    """List the API keys of the caller's tenant, revoked and expired ones included (owner).

    Keys are never shown again after their creation: only their first characters.
    """
    return key_page(repos, owner.tenant_id, page_size=page_size, page_token=page_token)


def key_page(
    repos: Repositories, tenant_id: str, *, page_size: int, page_token: str | None
) -> ApiKeyPage:
    """One page of a tenant's keys, as the owner's and the admin's listings show it."""
    rows, token = tenants.list_api_keys(
        repos, tenant_id=tenant_id, page_size=page_size, page_token=page_token
    )
    items = [ApiKey.model_validate(r, from_attributes=True) for r in rows]
    return ApiKeyPage(items=items, next_page_token=token)


@router.delete(
    "/{key_id}", status_code=204, operation_id="revoke_own_api_key", responses=errors(403, 404)
)
def revoke_own_api_key(
    key_id: Annotated[str, Path(max_length=64)],
    principal: CurrentPrincipal,
    repos: ReposDep,
) -> Response:
    """Revoke an API key of the caller's tenant (owner; the key in use too).

    Every API process refuses it within a second. Revoking a revoked key changes nothing.
    """
    tenants.revoke_api_key(repos, tenant_id=principal.tenant_id, key_id=key_id, by=principal)
    return Response(status_code=204)
