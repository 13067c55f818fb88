"""Operators' view of the service: Prometheus metrics and structured logs with a request id.

Metrics (``prometheus_client``). ``ppml serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
folder under the data dir before anything imports ``prometheus_client`` (which picks its
storage at import), and so before any API process or the embedded worker starts, so every
process writes its samples there (memory-mapped files, no lock on the hot path) and a scrape
of ``/metrics`` from any API process adds them up. Counted as things happen:

* ``ppml_http_request_duration_seconds{method, route, status}``: latency by route template
  (``/v1/jobs/{job_id}``, never the raw path, so ids do not explode the series);
* ``ppml_job_submissions_total{outcome, reason}``: admissions, and refusals by reason;
* ``ppml_training_steps_total``: optimiser steps the workers ran (throughput: its rate).

Read at scrape time from the database, never per request (:class:`ServiceCollector`): jobs by
status and the queue depth (jobs waiting for a worker), and webhook deliveries by status.

Logs. :func:`configure_logging` makes every record one JSON object (``ts``, ``level``,
``logger``, ``message``, ``request_id``, ``job_id`` when known). The API takes a client's
``X-Request-ID`` (or makes one), answers with it, and keeps it in :data:`request_id` for the
request's logs; ``ppml.queue`` sends it in the Celery task's headers, and the worker restores
it (with the job id) for the task's logs, so one id follows a job from its submit to its end.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

__all__ = [
    "HTTP_LATENCY",
    "JOB_SUBMISSIONS",
    "MULTIPROC_ENV",
    "TRAINING_STEPS",
    "JsonFormatter",
    "ServiceCollector",
    "configure_logging",
    "job_id",
    "logging_config",
    "request_id",
    "scrape",
    "valid_request_id",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The request id of what runs now (an API request, or the worker task it enqueued).
request_id: ContextVar[str | None] = ContextVar("ppml_request_id", default=None)
#: The job a worker task is running, for its logs.
job_id: ContextVar[str | None] = ContextVar("ppml_job_id", default=None)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

HTTP_LATENCY = Histogram(
    "ppml_http_request_duration_seconds",
    "API request latency, by route template.",
    ["method", "route", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
JOB_SUBMISSIONS = Counter(
    "ppml_job_submissions",
    "POST /v1/jobs answers: admitted, or refused and why (budget: 409, limits: 429, invalid: 4xx).",
    ["outcome", "reason"],
)
TRAINING_STEPS = Counter("ppml_training_steps", "Optimiser steps run by the workers.")


def valid_request_id(value: str | None) -> bool:
    """A client's ``X-Request-ID`` is kept if it is short and plain (it goes into logs)."""
    return value is not None and _REQUEST_ID.match(value) is not None


class ServiceCollector(Collector):
    """Gauges read when Prometheus scrapes: ``counts()`` returns jobs by status and webhook
    deliveries by status (one database read per scrape), ``streams()`` the event streams
    this API process holds open."""

    def __init__(
        self,
        counts: Callable[[], tuple[dict[str, int], dict[str, int]]],
        streams: Callable[[], int],
    ) -> None:
        self.counts, self.streams = counts, streams

    def collect(self) -> Iterator[Metric]:
        jobs, deliveries = self.counts()
        by_status = GaugeMetricFamily("ppml_jobs", "Jobs by status.", labels=["status"])
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            by_status.add_metric([status], jobs.get(status, 0))
        yield by_status
        yield GaugeMetricFamily(
            "ppml_queue_depth", "Jobs waiting for a worker (queued).", value=jobs.get("queued", 0)
        )
        hooks = GaugeMetricFamily(
            "ppml_webhook_deliveries", "Webhook deliveries by status.", labels=["status"]
        )
        for status in ("pending", "delivered", "failed"):
            hooks.add_metric([status], deliveries.get(status, 0))
        yield hooks
        yield GaugeMetricFamily(
            "ppml_event_streams_open",
            "Job event streams open in this API process.",
            value=self.streams(),
        )

    def describe(self) -> Iterable[Metric]:
        return []


def scrape(service: ServiceCollector) -> bytes:
    """The exposition text: every process's samples (multiprocess mode) or this process's,
    then the gauges read now."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        counted = generate_latest(registry)
    else:
        counted = generate_latest(REGISTRY)
    now = CollectorRegistry()
    now.register(service)
    return counted + generate_latest(now)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the request and job ids in context."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, var in (("request_id", request_id), ("job_id", job_id)):
            value = getattr(record, key, None) or var.get()
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def logging_config(fmt: str = "json", level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` that sends every logger (uvicorn's too) to stderr as
    JSON lines (``fmt="json"``) or plain text; uvicorn applies it in each API process."""
    formatter: dict[str, Any] = (
        {"()": "ppml.telemetry.JsonFormatter"}
        if fmt == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        # uvicorn's loggers keep no handlers of their own: their records reach the root's.
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Configure this process's logging with :func:`logging_config`."""
    logging.config.dictConfig(logging_config(fmt, level))
