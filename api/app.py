"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import ui
from api.auth import Authenticate
from api.errors import install_error_handlers
from api.events import StreamSlots
from api.heap import FrozenHeap
from api.limits import MULTIPART_SLACK, BodySizeLimit, NoSniff, NulGuard, RouteLimit
from api.observe import RequestTelemetry
from api.rates import TokenBuckets
from api.routes import (
    audit,
    datasets,
    federations,
    health,
    jobs,
    keys,
    models,
    node,
    receipts,
    statistics,
    synthetic,
    tenants,
)
from ppml.config import Limits, Settings, get_settings
from ppml.db.reads import AsyncReads
from ppml.db.session import Database
from ppml.queue import make_celery
from ppml.services.jobs import JobService
from ppml.storage import ArtifactStore

__all__ = ["ROUTERS", "create_app"]

log = logging.getLogger(__name__)

DESCRIPTION = """Train models on sensitive data with differential privacy.

Register a dataset with a privacy budget (ε, δ), submit DP-SGD jobs, poll them, and download
the trained model with its privacy receipt. A ledger refuses any job that would overspend a
dataset's budget. All `/v1` routes take `Authorization: Bearer <key>`.
"""


# Every router the app serves besides the dashboard's (ui.install), in the order included.
ROUTERS = (
    tenants.router,
    keys.router,
    datasets.router,
    statistics.router,
    federations.router,
    node.router,
    jobs.router,
    models.router,
    synthetic.router,
    receipts.router,
    audit.router,
    health.router,
    receipts.well_known,
)


def create_app(settings: Settings | None = None, db: Database | None = None) -> FastAPI:
    """Build the app. The database schema must already be migrated (``ppml db upgrade``)."""
    settings = settings or get_settings()
    db = db or Database(settings.resolved_database_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await reads.open()
        heap = FrozenHeap()
        heap.freeze()
        watcher = asyncio.create_task(heap.watch())
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await reads.close()
            db.dispose()

    app = FastAPI(
        title="ppml",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served from local files by api.ui, with the dashboard
        redoc_url=None,
        openapi_tags=[
            {"name": "tenants", "description": "Admin: tenants and API keys."},
            {"name": "keys", "description": "Owners: their tenant's API keys."},
            {"name": "datasets", "description": "Datasets, budgets and ledgers."},
            {"name": "jobs", "description": "Training jobs."},
            {
                "name": "federations",
                "description": "Owners: federations of remote data-owner nodes, their "
                "schema, budget and nodes.",
            },
            {
                "name": "node",
                "description": "Remote nodes (node credentials only): enrol, poll for "
                "tasks, download weights, upload updates.",
            },
            {"name": "models", "description": "Trained models and their privacy receipts."},
            {
                "name": "synthetic",
                "description": "DP synthetic tables of synthesize jobs and their quality reports.",
            },
            {
                "name": "receipts",
                "description": "Signed receipts of released models and the public keys "
                "that verify them offline.",
            },
            {
                "name": "audit",
                "description": "Owners: who did what to their tenant's objects, and when.",
            },
            {
                "name": "health",
                "description": "Liveness and readiness (open); Prometheus metrics (admin token).",
            },
        ],
    )
    app.state.settings = settings
    limits = settings.limits
    app.state.db = db
    app.state.store = ArtifactStore.for_settings(settings)
    app.state.reads = reads = AsyncReads(db)
    app.state.streams = StreamSlots(settings.events.max_per_tenant)
    app.state.quotes = TokenBuckets(rate=limits.quotes_per_second, burst=limits.quote_burst)
    app.state.jobs = JobService(db, settings, make_celery(settings))
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    ui.install(app)
    # The last added runs first: authentication, then body limits, before any route reads.
    app.add_middleware(NulGuard)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_json_bytes, routes=_body_limits(limits))
    app.add_middleware(Authenticate, settings=settings, db=db)
    app.add_middleware(NoSniff)
    app.add_middleware(RequestTelemetry)  # outermost: request id, latency of every answer
    return app


def _body_limits(limits: Limits) -> list[RouteLimit]:
    """Routes whose bodies may be larger than JSON's ``max_json_bytes``."""
    upload = limits.max_upload_bytes + MULTIPART_SLACK
    return [
        RouteLimit("POST", "/v1/datasets/upload", upload, media_type="multipart/form-data"),
        RouteLimit("POST", "/v1/jobs/[^/]+/predict", limits.max_predict_bytes),
        # Checked exactly against the model's size by the route (ppml.services.nodes).
        RouteLimit("POST", "/v1/node/tasks/[^/]+/update", 4 * limits.max_parameters + (1 << 20)),
        # Unauthenticated until the body's token is checked: small bodies only, yet room for
        # any valid one (a 2,000-character message of JSON-escaped surrogate pairs is 24 KB).
        RouteLimit("POST", "/v1/node/(schema|enrol)", 256 * 1024),
    ]
