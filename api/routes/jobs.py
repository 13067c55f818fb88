"""Jobs: submit (with admission), quote, poll, list, cancel, follow.

The hot routes are ``async def``: the service call (database work) makes one thread-pool hop,
and the response is validated and serialised on the event loop, instead of a hop for the
route and another for validating a plain ``def`` route's answer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

from fastapi import BackgroundTasks, Depends, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api.deps import (
    CurrentPrincipal,
    CurrentTenant,
    JobServiceDep,
    OwnedJob,
    ReposDep,
    RequireOwner,
    SettingsDep,
)
from api.events import EventStream, StreamSlots, follow
from api.rates import TokenBuckets
from api.routes.common import DEFAULT_PAGE_SIZE, PageSize, PageToken, Router, errors
from api.schemas import (
    ExactMetrics,
    ExactScores,
    Job,
    JobPage,
    JobSpec,
    JobStatusFilter,
    MetricsHistory,
    MetricsPoint,
    Quote,
)
from ppml.config import Settings
from ppml.db import models
from ppml.db.reads import EVENT_BATCH, AsyncReads
from ppml.errors import TooManyRequests
from ppml.jobs import webhooks
from ppml.jobs.records import Progress
from ppml.trust.sealing import DataKeys

router = Router(prefix="/v1/jobs", tags=["jobs"])

StatusFilter = Annotated[JobStatusFilter | None, Query(description="Only jobs in this status.")]


def to_schema(row: models.Job) -> Job:
    return Job.model_validate(row, from_attributes=True)


async def _quote_turn(request: Request, tenant_id: CurrentTenant) -> None:
    """A token of the tenant's quote bucket (this process), else 429 with Retry-After.

    A dependency, so it is taken before the body is validated or priced: a flood of quotes,
    valid or not, costs a dictionary lookup each.
    """
    buckets: TokenBuckets = request.app.state.quotes
    wait = buckets.take(tenant_id)
    if wait > 0:
        raise TooManyRequests(
            f"at most {buckets.rate:g} quotes per second per tenant (bursts of {buckets.burst})",
            limit=buckets.rate,
            burst=buckets.burst,
            retry_after=max(1, math.ceil(wait)),
        )


QuoteTurn = Annotated[None, Depends(_quote_turn)]


@router.post(
    "",
    status_code=202,
    operation_id="create_job",
    responses=errors(404, 409, 429),
    response_model=Job,
)
async def create_job(
    spec: JobSpec,
    tenant_id: CurrentTenant,
    principal: CurrentPrincipal,
    jobs: JobServiceDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", max_length=200, description="Replays return the job."),
    ] = None,
) -> Job:
    """Submit a training job. Its privacy cost is reserved now, or the job is refused (409).

    A job whose estimated compute passes the per-job limit is a 422; a tenant whose queued and
    running jobs leave no room for it (by count or by compute) is answered 429 with
    Retry-After, with the figures. A job that names a ``webhook_url`` gets its signing
    secret in this answer only."""
    if spec.webhook_url is not None:  # the worker checks what the host resolves to
        allow = settings.webhooks.allow_private_addresses
        webhooks.check_url(spec.webhook_url, allow_private=allow, resolve=False)
    job, _created = await run_in_threadpool(
        functools.partial(
            jobs.submit, tenant_id, spec, idempotency_key=idempotency_key, by=principal
        )
    )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    resource = to_schema(job)
    if job.spec.webhook_url is not None:
        resource.webhook_secret = webhooks.job_secret(DataKeys.from_settings(settings), job.id)
    return resource


@router.post(
    "/quote", operation_id="quote_job", responses=errors(404, 409, 429), response_model=Quote
)
async def quote_job(
    _turn: QuoteTurn, spec: JobSpec, tenant_id: CurrentTenant, jobs: JobServiceDep
) -> Quote:
    """Price a job (ε, σ, compute) and say whether it fits the budget. Reserves nothing.

    Quotes are rate-limited per tenant (429 with Retry-After) and cached until the dataset's
    budget changes."""
    quote = await run_in_threadpool(jobs.quote, tenant_id, spec)
    return Quote.model_validate(quote, from_attributes=True)


@router.get("", operation_id="list_jobs", responses=errors(), response_model=JobPage)
def list_jobs(
    tenant_id: CurrentTenant,
    repos: ReposDep,
    status: StatusFilter = None,
    dataset_id: Annotated[str | None, Query(max_length=64)] = None,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> JobPage:
    """List the tenant's jobs, newest first."""
    rows, token = repos.list_jobs(
        tenant_id, status=status, dataset_id=dataset_id, page_size=page_size, page_token=page_token
    )
    return JobPage(items=[to_schema(r) for r in rows], next_page_token=token)


@router.get("/{job_id}", operation_id="get_job", responses=errors(404), response_model=Job)
async def get_job(job: OwnedJob) -> Job:
    """A job's status, progress, metrics and privacy figures."""
    return to_schema(job)


@router.get(
    "/{job_id}/metrics/exact",
    operation_id="get_exact_metrics",
    responses=errors(403, 404),
    response_model=ExactMetrics,
)
async def get_exact_metrics(job: OwnedJob, _owner: RequireOwner) -> ExactMetrics:
    """The exact held-out figures of a job (owner keys only): accuracy over rows and the
    unclipped mean loss, per scored round too. Analysts see the released metrics on the job."""
    exact = job.exact_metrics
    return ExactMetrics(
        job_id=job.id,
        metrics=exact.metrics if exact else None,
        history=exact.history if exact else None,
    )


@router.get(
    "/{job_id}/metrics",
    operation_id="get_job_metrics",
    responses=errors(404),
    response_model=MetricsHistory,
)
def get_job_metrics(
    job: OwnedJob,
    principal: CurrentPrincipal,
    repos: ReposDep,
    after: Annotated[
        int,
        Query(ge=0, le=2**31 - 1, description="Only reports after this event id (`seq`)."),
    ] = 0,
) -> MetricsHistory:
    """A job's metrics history: each progress report (steps, epoch or round, ε spent so far,
    an ETA) as the event stream carried it, and the released held-out metrics per scoring once
    the job has ended. Owner keys also get the exact held-out figures, live (per epoch end or
    scored round); analysts get null there."""
    events = repos.job_events(job.id, after=after, limit=EVENT_BATCH)
    more = len(events) == EVENT_BATCH
    reports = [e for e in events if e.kind == models.JobEventKind.PROGRESS]
    released = job.metrics_history or ([job.metrics] if job.metrics is not None else None)
    return MetricsHistory(
        job_id=job.id,
        status=job.status,
        points=[_point(job, e.seq, e.created_at, Progress.model_validate(e.data)) for e in reports],
        next_after=events[-1].seq if more else None,
        released=released,
        exact=_exact(job, events, first_page=after == 0) if principal.is_owner else None,
    )


def _exact(
    job: models.Job, events: Sequence[models.JobEvent], *, first_page: bool
) -> list[ExactScores] | None:
    """The owner's exact figures: as scored during training (the ``scores`` events of this
    page), or on the first page of a job that recorded none, its stored final figures."""
    scored = [
        ExactScores.model_validate(e.data) for e in events if e.kind == models.JobEventKind.SCORES
    ]
    stored = job.exact_metrics
    if scored or stored is None or not first_page:
        return scored or None
    return stored.history or ([stored.metrics] if stored.metrics else None)


def _point(job: models.Job, seq: int, at: datetime, progress: Progress) -> MetricsPoint:
    """A report as a point of the history, with the time left at the pace since the start."""
    eta = progress.eta_seconds  # the worker's, at its pace since its claim
    started = job.started_at
    if eta is None and started is not None and 0 < progress.fraction < 1:
        elapsed = (_aware(at) - _aware(started)).total_seconds()
        eta = max(0.0, elapsed * (1 - progress.fraction) / progress.fraction)
    return MetricsPoint(
        seq=seq,
        at=at,
        steps=progress.steps,
        epoch=progress.epoch,
        round=progress.round,
        fraction=progress.fraction,
        epsilon_spent=progress.epsilon_spent,
        eta_seconds=eta,
    )


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive UTC datetimes; PostgreSQL aware ones.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    operation_id="cancel_job",
    responses=errors(404, 409),
    response_model=Job,
)
def cancel_job(
    job_id: Annotated[str, Path(max_length=64)],
    tenant_id: CurrentTenant,
    principal: CurrentPrincipal,
    jobs: JobServiceDep,
    repos: ReposDep,
    background: BackgroundTasks,
) -> Job:
    """Cancel a job. Queued jobs stop at once with a full refund; running jobs stop at the next
    step and are charged for the steps they ran. Finished jobs answer 409."""
    # The service looks the job up within the tenant (404 otherwise): no second read here.
    # It runs in the request's unit of work, committed before the response is sent; the
    # checkpoints of a job it cancelled are deleted after that.
    job = jobs.cancel_in(repos, tenant_id, job_id, by=principal)
    if job.status == "cancelled":
        background.add_task(jobs.forget, job.id)
    return to_schema(job)


@router.get(
    "/{job_id}/events",
    operation_id="stream_job_events",
    responses={
        **errors(404, 429),
        200: {
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": 'retry: 2000\nid: 4\nevent: progress\ndata: {"fraction": 0.5, '
                    '"epoch": 2, "round": null, "steps": 24, "epsilon_spent": 1.1, '
                    '"eta_seconds": 6.5}\n\n',
                }
            },
            "description": "Server-sent events, each `id: <seq>` (resume with Last-Event-ID), "
            '`event: <kind>` and `data: <JSON>`: `status` ({"status": ...}), `progress` (a '
            "Progress), `scores` (an ExactScores, owner keys only), then `end` (the Job) "
            "before the stream closes. `: keep-alive` comments fill quiet times.",
        },
    },
    response_class=StreamingResponse,
)
async def stream_job_events(
    job: OwnedJob,
    tenant_id: CurrentTenant,
    principal: CurrentPrincipal,
    request: Request,
    last_event_id: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=2**31 - 1,
            description="The id of the last event received: the stream resumes after it.",
        ),
    ] = None,
) -> StreamingResponse:
    """Server-sent events until the job ends: ``status`` and ``progress`` (each with the id of
    the job's event sequence), ``scores`` (exact held-out figures at each epoch end or scored
    round: owner keys only), then ``end`` with the job. A job's final ``progress`` comes
    before its terminal ``status``. Without ``Last-Event-ID`` the stream
    starts with the job's current status and progress; with it, it replays what came after.
    A stream lasts at most the server's maximum duration (reconnect with ``Last-Event-ID``);
    a tenant holding too many open streams is answered 429 with ``Retry-After``."""
    settings: Settings = request.app.state.settings
    config = settings.events
    slots: StreamSlots = request.app.state.streams
    if not slots.take(tenant_id):
        raise TooManyRequests(
            f"at most {slots.per_tenant} open event streams per tenant",
            limit=slots.per_tenant,
            retry_after=config.retry_after_s,
        )
    reads: AsyncReads = request.app.state.reads
    stream = follow(
        request,
        reads,
        tenant_id,
        job.id,
        after=last_event_id,
        config=config,
        owner=principal.is_owner,
    )
    return EventStream(stream, on_close=functools.partial(slots.give_back, tenant_id))
