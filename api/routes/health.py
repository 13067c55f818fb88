"""Liveness, readiness and metrics (open routes)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from api.deps import DatabaseDep
from api.errors import problem
from api.events import StreamSlots
from api.schemas import Problem
from ppml.db.repositories import Repositories

router = APIRouter(tags=["health"])


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


@router.get("/metrics", operation_id="get_metrics", response_class=PlainTextResponse)
def get_metrics(db: DatabaseDep, request: Request) -> str:
    """Prometheus text format: jobs by status; event streams open in this API process."""
    with db.session() as session:
        counts = Repositories(session).jobs_by_status()
    lines = ["# HELP ppml_jobs Jobs by status.", "# TYPE ppml_jobs gauge"]
    lines += [f'ppml_jobs{{status="{status}"}} {count}' for status, count in counts.items()]
    streams: StreamSlots = request.app.state.streams
    lines += [
        "# HELP ppml_event_streams_open Job event streams open in this API process.",
        "# TYPE ppml_event_streams_open gauge",
        f"ppml_event_streams_open {streams.total}",
    ]
    return "\n".join(lines) + "\n"
