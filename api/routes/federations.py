"""Federations of remote data-owner nodes (#16): the owner's routes (API keys)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Response

from api.deps import CurrentPrincipal, ReposDep
from api.routes.common import DEFAULT_PAGE_SIZE, PageSize, PageToken, Router, errors
from api.schemas.federations import (
    Federation,
    FederationBudget,
    FederationCreate,
    FederationPage,
    NodeCreate,
    NodeInvitation,
    NodeView,
    SchemaCheckView,
)
from ppml.db import federations as models
from ppml.db.models import utcnow
from ppml.db.repositories import Repositories
from ppml.privacy.budgets import budget_status
from ppml.services import federations as service
from ppml.services.datasets import BudgetRequest

router = Router(prefix="/v1/federations", tags=["federations"])

FederationId = Annotated[str, Path(max_length=64)]


def node_view(node: models.FederationNode) -> NodeView:
    seen = node.last_seen
    check = None
    if node.schema_ok is not None:
        check = SchemaCheckView(ok=node.schema_ok, rows=node.rows, message=node.check_message or "")
    return NodeView(
        id=node.id,
        name=node.name,
        status=models.NodeStatus(node.status).value,
        online=seen is not None and utcnow() - seen <= service.ONLINE_WITHIN,
        last_seen=seen,
        software_version=node.software_version,
        schema_check=check,
    )


def _views(repos: Repositories, rows: list[models.Federation]) -> list[Federation]:
    nodes: dict[str, list[NodeView]] = {row.id: [] for row in rows}
    for node in repos.federation_nodes(list(nodes)):
        nodes[node.federation_id].append(node_view(node))
    views = []
    for row in rows:
        budget = None
        stored = repos.budget(row.dataset_id)
        if stored is not None:
            status = budget_status(stored)
            budget = FederationBudget(
                epsilon_total=status.epsilon_total,
                delta_total=status.delta_total,
                epsilon_spent=status.epsilon_spent,
                epsilon_reserved=status.epsilon_reserved,
                epsilon_remaining=status.epsilon_remaining,
                epsilon_spent_composed=status.epsilon_spent_composed,
            )
        views.append(
            Federation.model_validate(
                {
                    "id": row.id,
                    "name": row.name,
                    "schema": row.data_schema,
                    "privacy_unit": row.privacy_unit,
                    "dataset_id": row.dataset_id,
                    "budget": budget,
                    "nodes": nodes[row.id],
                    "created_at": row.created_at,
                }
            )
        )
    return views


@router.post(
    "",
    status_code=201,
    operation_id="create_federation",
    responses=errors(403),
    response_model=Federation,
    response_model_by_alias=True,
)
def create_federation(
    body: FederationCreate, principal: CurrentPrincipal, repos: ReposDep, response: Response
) -> Federation:
    """Create a federation (owner keys): a schema every node's data must match, and its
    privacy unit. A client-unit federation needs a budget (its jobs are charged there); a
    record-unit one takes none (each node's own ledger is the budget of its rows)."""
    budget = body.budget
    row = service.create_federation(
        repos,
        tenant_id=principal.tenant_id,
        name=body.name,
        schema=body.data_schema,
        privacy_unit=body.privacy_unit,
        budget=BudgetRequest(epsilon=budget.epsilon, delta=budget.delta) if budget else None,
        by=principal,
    )
    response.headers["Location"] = f"/v1/federations/{row.id}"
    return _views(repos, [row])[0]


@router.get("", operation_id="list_federations", responses=errors(), response_model=FederationPage)
def list_federations(
    principal: CurrentPrincipal,
    repos: ReposDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> FederationPage:
    """The tenant's federations, newest first, with their nodes."""
    rows, token = repos.list_federations(
        principal.tenant_id, page_size=page_size, page_token=page_token
    )
    return FederationPage(items=_views(repos, rows), next_page_token=token)


@router.get(
    "/{federation_id}",
    operation_id="get_federation",
    responses=errors(404),
    response_model=Federation,
)
def get_federation(
    federation_id: FederationId, principal: CurrentPrincipal, repos: ReposDep
) -> Federation:
    """A federation, its budget and its nodes: status, online (seen in the last 30 s), last
    seen, software version and the check of their data against the schema."""
    row = service.get_federation(repos, principal.tenant_id, federation_id)
    return _views(repos, [row])[0]


@router.post(
    "/{federation_id}/nodes",
    status_code=201,
    operation_id="create_federation_node",
    responses=errors(403, 404),
    response_model=NodeInvitation,
)
def create_node(
    federation_id: FederationId, body: NodeCreate, principal: CurrentPrincipal, repos: ReposDep
) -> NodeInvitation:
    """Invite a node (owner keys): its enrolment token is shown once, is good for one
    enrolment and expires after 24 hours (`ppml node run --enrol TOKEN`)."""
    invitation = service.add_node(
        repos,
        tenant_id=principal.tenant_id,
        federation_id=federation_id,
        name=body.name,
        by=principal,
    )
    return NodeInvitation(
        node=node_view(invitation.node),
        enrolment_token=invitation.enrolment_token,
        expires_at=invitation.expires_at,
    )


@router.delete(
    "/{federation_id}/nodes/{node_id}",
    status_code=204,
    operation_id="revoke_federation_node",
    responses=errors(403, 404),
)
def revoke_node(
    federation_id: FederationId,
    node_id: Annotated[str, Path(max_length=64)],
    principal: CurrentPrincipal,
    repos: ReposDep,
) -> Response:
    """Revoke a node (owner keys): its credential stops working at once and its open tasks
    become stale."""
    service.revoke_node(
        repos,
        tenant_id=principal.tenant_id,
        federation_id=federation_id,
        node_id=node_id,
        by=principal,
    )
    return Response(status_code=204)
