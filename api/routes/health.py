"""Liveness, readiness and metrics (open routes)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select, text

from api.deps import DatabaseDep
from api.errors import problem
from ppml.db.models import Job

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="get_health")
def get_health() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", operation_id="get_readiness", response_model=None)
def get_readiness(db: DatabaseDep) -> dict[str, str] | object:
    """The database answers."""
    try:
        with db.session() as session:
            session.execute(text("SELECT 1"))
    except Exception:
        return problem(503, "not-ready", "Not ready", "the database is unreachable")
    return {"status": "ready"}


@router.get("/metrics", operation_id="get_metrics", response_class=PlainTextResponse)
def get_metrics(db: DatabaseDep) -> str:
    """Prometheus text format: jobs by status."""
    with db.session() as session:
        rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    lines = ["# HELP ppml_jobs Jobs by status.", "# TYPE ppml_jobs gauge"]
    lines += [f'ppml_jobs{{status="{status}"}} {count}' for status, count in rows]
    return "\n".join(lines) + "\n"
