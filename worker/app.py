"""The Celery worker: thin tasks that hand a job id to ``ppml.jobs.runner.JobRunner`` and a
dataset id to ``ppml.services.ingestion``."""

from __future__ import annotations

import logging
from contextvars import Token
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutdown

from ppml import telemetry
from ppml.config import get_settings
from ppml.db.session import UNAVAILABLE, Database
from ppml.jobs.reaper import Reaper
from ppml.jobs.runner import ClaimUnavailable, JobRunner
from ppml.jobs.webhooks import WebhookSender
from ppml.queue import INGEST_DATASET, RUN_JOB, TRACE_HEADER, enqueue_job, make_celery
from ppml.services.ingestion import ingest_upload
from ppml.storage import ArtifactStore

__all__ = ["celery_app", "ingest_dataset", "run_job"]

log = logging.getLogger(__name__)

celery_app = make_celery(get_settings())


@lru_cache(maxsize=1)
def _runner() -> JobRunner:
    # One engine per worker process, made after fork.
    settings = get_settings()
    db = Database(settings.resolved_database_url, pool_size=2)
    return JobRunner(db, settings, enqueue=lambda job_id: enqueue_job(celery_app, job_id))


@lru_cache(maxsize=1)
def _reaper() -> Reaper:
    settings = get_settings()
    return Reaper(Database(settings.resolved_database_url, pool_size=1), settings, celery_app)


@lru_cache(maxsize=1)
def _webhooks() -> WebhookSender:
    settings = get_settings()
    return WebhookSender(Database(settings.resolved_database_url, pool_size=1), settings)


def busy_flag() -> Path:
    """A file that exists while this worker runs a task. The solo pool answers no broker
    ping during a task, so the container healthcheck (docs/operations.md) accepts either."""
    return get_settings().data_dir / "worker.busy"


@worker_ready.connect
def _start_reaper(**_kwargs: object) -> None:
    busy_flag().unlink(missing_ok=True)  # left by a process killed mid-task
    # Import torch and the training code now, not inside the first job's lease.
    import torch

    import ppml.training.dp_sgd  # noqa: F401

    threads = get_settings().worker.torch_threads
    if threads:
        torch.set_num_threads(threads)

    _reaper().start()
    _webhooks().start()  # the jobs' webhook outbox (ppml.jobs.webhooks)


@worker_shutdown.connect
def _stop_reaper(**_kwargs: object) -> None:
    _reaper().stop()
    _webhooks().stop()


_trace: list[tuple[Token[str | None], Token[str | None]]] = []


@task_prerun.connect
def _enter_trace(task: Any = None, args: Any = None, **_kwargs: object) -> None:
    """The enqueuing request's id and the job's id in every log line of the task."""
    request = getattr(task, "request", None)
    rid = getattr(request, TRACE_HEADER, None) or (getattr(request, "headers", None) or {}).get(
        TRACE_HEADER
    )
    job = args[0] if getattr(task, "name", None) == RUN_JOB and args else None
    busy_flag().parent.mkdir(parents=True, exist_ok=True)
    busy_flag().write_text(str(getattr(task, "name", "")))
    _trace.append((telemetry.request_id.set(rid), telemetry.job_id.set(job)))
    if job is not None:
        log.info("job %s: task received", job)


@task_postrun.connect
def _leave_trace(**_kwargs: object) -> None:
    busy_flag().unlink(missing_ok=True)
    if _trace:
        rid, job = _trace.pop()
        telemetry.job_id.reset(job)
        telemetry.request_id.reset(rid)


@celery_app.task(
    name=RUN_JOB,
    acks_late=True,
    # Only the claim is retried: once claimed, the runner trains through database outages
    # shorter than the lease, and the reaper recovers the job after longer ones.
    autoretry_for=(ClaimUnavailable,),
    retry_backoff=True,
    max_retries=5,
)
def run_job(job_id: str) -> str:
    """Run a queued job. Safe to deliver twice: only one delivery can claim it."""
    return _runner().run(job_id)


@celery_app.task(
    name=INGEST_DATASET,
    acks_late=True,
    # A database outage is retried; everything else ends the dataset ready or invalid.
    autoretry_for=UNAVAILABLE,
    retry_backoff=True,
    max_retries=5,
)
def ingest_dataset(dataset_id: str) -> str:
    """Validate a stored upload. Safe to deliver twice: only a validating dataset is ingested."""
    settings = get_settings()
    return ingest_upload(_runner().db, ArtifactStore.for_settings(settings), settings, dataset_id)
