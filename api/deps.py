"""Request dependencies as ``Annotated`` aliases: a route's signature says what it needs.

FastAPI runs every plain ``def`` dependency in the thread pool, one hop each, and under load
each hop waits for a thread and the GIL. Dependencies that do no I/O are therefore
``async def`` (they run on the event loop), and those that read the database make one hop;
the job lookup behind polls and downloads makes none on PostgreSQL (``ppml.db.reads``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.requests import HTTPConnection

from api.auth import (
    NODE_SCOPE_KEY,
    PRINCIPAL_SCOPE_KEY,
    is_admin_token,
    node_for_credential,
    principal_for_token,
)
from ppml.config import Settings
from ppml.db.models import Dataset, Job
from ppml.db.reads import AsyncReads
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import NotFound, Unauthorized
from ppml.services.datasets import require_live
from ppml.services.jobs import JobService
from ppml.services.nodes import CREDENTIAL_PREFIX, NodePrincipal
from ppml.services.tenants import Principal, require_owner
from ppml.storage import ArtifactStore

__all__ = [
    "AdminAuth",
    "CurrentNode",
    "CurrentPrincipal",
    "CurrentTenant",
    "DatabaseDep",
    "JobServiceDep",
    "OwnedDataset",
    "OwnedJob",
    "ReposDep",
    "RequireOwner",
    "SettingsDep",
    "StoreDep",
    "request_principal",
]


class _Bearer(HTTPBearer):
    """The bearer scheme OpenAPI declares; it leaves the header unread when
    :class:`api.auth.Authenticate` already resolved the request's key or node credential."""

    async def __call__(self, request: HTTPConnection) -> HTTPAuthorizationCredentials | None:
        scope = request.scope
        if PRINCIPAL_SCOPE_KEY in scope or NODE_SCOPE_KEY in scope:
            return None
        return await super().__call__(request)


_bearer = _Bearer(
    auto_error=False, scheme_name="HTTPBearer", description="An API key, or the admin token."
)


async def _database(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _store(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.store
    return store


async def _job_service(request: Request) -> JobService:
    service: JobService = request.app.state.jobs
    return service


DatabaseDep = Annotated[Database, Depends(_database)]
SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[ArtifactStore, Depends(_store)]
JobServiceDep = Annotated[JobService, Depends(_job_service)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _session(request: Request, db: DatabaseDep) -> Iterator[Session]:
    """The request's unit of work: committed when the route returns, rolled back on error."""
    with db.session(write=request.method not in ("GET", "HEAD")) as session:
        yield session


# scope="function": commit before the response is sent, so a client that reads its own
# write right after a 201 finds it, and a failed commit answers an error instead of vanishing.
async def _repos(
    session: Annotated[Session, Depends(_session, scope="function")],
) -> Repositories:
    return Repositories(session)


ReposDep = Annotated[Repositories, Depends(_repos, scope="function")]


# The checks below repeat what api.auth.Authenticate did before the body was read (it leaves
# the key's principal in the scope), so a route stays guarded in an app without it.
async def _admin(credentials: Credentials, settings: SettingsDep) -> None:
    if credentials is None:
        raise Unauthorized("missing bearer token")
    if not is_admin_token(settings, credentials.credentials):
        raise Unauthorized("invalid admin token")


async def _principal(request: Request, credentials: Credentials) -> Principal:
    """The request's principal: the one the middleware resolved, else the bearer key's
    (then kept in the scope, as the middleware keeps it, for the request's other uses)."""
    found: Principal | None = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if found is not None:
        return found
    if credentials is None:
        raise Unauthorized("missing bearer token")
    if credentials.credentials.startswith(CREDENTIAL_PREFIX):
        raise Unauthorized("node credentials are accepted only on /v1/node/ routes")
    db: Database = request.app.state.db
    principal = await principal_for_token(db, credentials.credentials)
    if principal is None:
        raise Unauthorized("invalid API key")
    request.scope[PRINCIPAL_SCOPE_KEY] = principal
    return principal


def request_principal(request: Request) -> Principal:
    """The principal a resolved :data:`OwnedJob` (or :data:`CurrentPrincipal`) found."""
    principal: Principal = request.scope[PRINCIPAL_SCOPE_KEY]
    return principal


CurrentPrincipal = Annotated[Principal, Depends(_principal)]


async def _node(request: Request, credentials: Credentials) -> NodePrincipal:
    found: NodePrincipal | None = request.scope.get(NODE_SCOPE_KEY)
    if found is not None:
        return found
    if credentials is None:
        raise Unauthorized("missing bearer token")
    db: Database = request.app.state.db
    node = await node_for_credential(db, credentials.credentials)
    if node is None:
        raise Unauthorized("invalid node credential")
    return node


CurrentNode = Annotated[NodePrincipal, Depends(_node)]


async def _tenant(principal: CurrentPrincipal) -> str:
    return principal.tenant_id


async def _owner(principal: CurrentPrincipal) -> Principal:
    require_owner(principal)
    return principal


AdminAuth = Annotated[None, Depends(_admin)]
CurrentTenant = Annotated[str, Depends(_tenant)]
# An owner key of the tenant, else 403. FastAPI resolves parameters in order: put it after
# the OwnedJob / OwnedDataset parameter, so another tenant's id still answers 404.
RequireOwner = Annotated[Principal, Depends(_owner)]


def _owned_dataset(
    tenant_id: CurrentTenant,
    repos: ReposDep,
    dataset_id: Annotated[str, Path(max_length=64)],
) -> Dataset:
    dataset = repos.dataset(tenant_id, dataset_id)
    if dataset is None:
        raise NotFound("dataset not found")
    require_live(dataset)  # a deleted dataset is 404 (dataset-deleted) on every route
    return dataset


async def _owned_job(
    request: Request,
    credentials: Credentials,
    job_id: Annotated[str, Path(max_length=64)],
) -> Job:
    # No thread on PostgreSQL: the read runs on the event loop (ppml.db.reads). The principal
    # is resolved here rather than by a CurrentPrincipal dependency: one dependency less to
    # solve on every poll and download (a route that also takes CurrentPrincipal finds it in
    # the scope).
    principal = await _principal(request, credentials)
    reads: AsyncReads = request.app.state.reads
    job = await reads.job(principal.tenant_id, job_id)
    if job is None:
        raise NotFound("job not found")
    return job


OwnedDataset = Annotated[Dataset, Depends(_owned_dataset)]
OwnedJob = Annotated[Job, Depends(_owned_job)]
