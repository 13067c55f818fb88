"""Liveness and readiness (open routes), and the operators' metrics (admin token)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from api.deps import AdminAuth, DatabaseDep
from api.errors import PROBLEM_MEDIA_TYPE, problem
from api.events import StreamSlots
from api.routes.common import CheckedRoute
from api.schemas import Problem
from ppml.db.repositories import Repositories
from ppml.telemetry import ServiceCollector, scrape

router = APIRouter(tags=["health"], route_class=CheckedRoute)


class Health(BaseModel):
    status: str


@router.get("/healthz", operation_id="get_health", response_model=Health)
def get_health() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get(
    "/readyz",
    operation_id="get_readiness",
    response_model=Health,
    responses={503: {"model": Problem, "description": "The database is unreachable."}},
)
def get_readiness(db: DatabaseDep) -> Health | JSONResponse:
    """The database answers."""
    try:
        with db.session() as session:
            Repositories(session).ping()
    except Exception:
        return problem(503, "not-ready", "Not ready", "the database is unreachable")
    return Health(status="ready")


_ADMIN_ONLY = "The admin token (Authorization: Bearer $PPML_ADMIN_TOKEN) is missing or wrong."


@router.get(
    "/metrics",
    operation_id="get_metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
        # No "model": FastAPI would file the Problem under this route's text/plain.
        401: {
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
            "description": _ADMIN_ONLY,
        },
    },
)
def get_metrics(_admin: AdminAuth, db: DatabaseDep, request: Request) -> Response:
    """Prometheus metrics, for operators: the admin token is required (it is not open to the
    world). Request latency by route template, admissions and refusals, training steps (from
    the workers), jobs by status, queue depth, webhook deliveries and open event streams;
    every API process and the embedded worker are added up (docs/api.md, "Metrics, logs
    and request ids")."""
    streams: StreamSlots = request.app.state.streams

    def counts() -> tuple[dict[str, int], dict[str, int]]:
        with db.session() as session:
            repos = Repositories(session)
            return repos.jobs_by_status(), repos.webhooks_by_status()

    body = scrape(ServiceCollector(counts, lambda: streams.total))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
