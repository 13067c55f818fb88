"""The Celery application shared by the API (which only sends) and the workers.

Tasks are addressed by name, with ids only; the API never imports task code.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu import Queue

from ppml import fsbroker, telemetry
from ppml.config import Settings

__all__ = [
    "INGEST_DATASET",
    "RUN_JOB",
    "TRACE_HEADER",
    "enqueue_ingestion",
    "enqueue_job",
    "make_celery",
]

RUN_JOB = "ppml.run_job"
# Validates a stored upload outside the API (ppml.services.ingestion); same queue as jobs,
# so the embedded worker runs it too.
INGEST_DATASET = "ppml.ingest_dataset"

#: The task header that carries the request id of whoever enqueued the job.
TRACE_HEADER = "ppml_request_id"

log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for long, idempotent training tasks."""
    app = Celery("ppml", broker=settings.resolved_broker_url)
    transport_options: dict[str, Any] = {
        # Redeliver only after the longest job could have finished (Celery's Redis docs).
        "visibility_timeout": settings.worker.job_time_limit_s + 3600,
    }
    if settings.resolved_broker_url.startswith("filesystem://"):
        folder = settings.broker_folder
        (folder / "control").mkdir(parents=True, exist_ok=True)
        transport_options.update(
            data_folder_in=str(folder),
            data_folder_out=str(folder),
            control_folder=str(folder / "control"),  # default is ./control in the cwd
            store_processed=False,
            # The folder is listed this often: a job starts, and a stopping worker notices
            # its signal, within about this long (kombu's default is 1 s).
            polling_interval=0.1,
        )
    queue = settings.worker.queue
    if settings.resolved_broker_url.startswith("filesystem://"):
        # kombu's own transport can drop a message a consumer catches half-written.
        app.conf.broker_transport = fsbroker.TRANSPORT
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(queue)],
        task_default_queue=queue,
        task_routes={RUN_JOB: {"queue": queue}, INGEST_DATASET: {"queue": queue}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_time_limit=settings.worker.job_time_limit_s + 300,
        worker_hijack_root_logger=False,
    )
    return app


def _trace_headers() -> dict[str, str]:
    """The request id of the API request (or task) that sends, for the task's logs
    (``ppml.telemetry``; the worker restores it)."""
    rid = telemetry.request_id.get()
    return {TRACE_HEADER: rid} if rid else {}


def enqueue_job(app: Celery, job_id: str) -> bool:
    """Send ``run_job(job_id)``; False (logged) when the broker is unreachable.

    A job that could not be enqueued stays ``queued`` with no ``enqueued_at``; the reaper
    sends it again.
    """
    try:
        app.send_task(
            RUN_JOB,
            args=[job_id],
            queue=app.conf.task_default_queue,
            retry=False,
            headers=_trace_headers(),
        )
    except Exception:
        log.exception("could not enqueue job %s", job_id)
        return False
    return True


def enqueue_ingestion(app: Celery, dataset_id: str) -> bool:
    """Send ``ingest_dataset(dataset_id)``; False (logged) when the broker is unreachable.

    A dataset whose message was lost stays ``validating``; the reaper sends it again.
    """
    try:
        app.send_task(
            INGEST_DATASET, args=[dataset_id], queue=app.conf.task_default_queue, retry=False
        )
    except Exception:
        log.exception("could not enqueue the ingestion of dataset %s", dataset_id)
        return False
    return True
