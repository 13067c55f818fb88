"""Request telemetry: the request id (``X-Request-ID`` in and out) and the latency histogram
by route template, with admissions and refusals of ``POST /v1/jobs`` (``ppml.telemetry``).

Pure ASGI, outermost, so it times what every other layer does (401s and 413s included) and
costs no database work: a context variable, a clock and one histogram sample a request
(``bench/telemetry.py`` times it).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ppml import telemetry

__all__ = ["RequestTelemetry"]

_SUBMIT_REASONS = {409: "budget", 429: "limits"}
# New request ids: a random prefix per process and a counter (32 hex digits at first), unique
# across processes and restarts without a random draw per request.
_PREFIX = os.urandom(12).hex()
_serial = itertools.count(1)


class RequestTelemetry:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        rid = given.decode("latin-1")
        if not telemetry.valid_request_id(rid):
            rid = f"{_PREFIX}{next(_serial):08x}"
        token = telemetry.request_id.set(rid)
        status = 500  # what the client gets if the app raises before it answers
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            telemetry.request_id.reset(token)
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            _latency(method, template, status).observe(time.perf_counter() - started)
            if method == "POST" and template == "/v1/jobs":
                _count_submission(status)


_children: dict[tuple[str, str, int], Any] = {}


def _latency(method: str, template: str, status: int) -> Any:
    """The histogram's child for these labels, kept: ``labels()`` validates and locks on every
    call, and the set of routes, methods and statuses is small and fixed."""
    key = (method, template, status)
    child = _children.get(key)
    if child is None:
        child = _children[key] = telemetry.HTTP_LATENCY.labels(method, template, str(status))
    return child


def _count_submission(status: int) -> None:
    if status < 300:
        telemetry.JOB_SUBMISSIONS.labels("admitted", "").inc()
    elif status < 500:
        reason = _SUBMIT_REASONS.get(status, "invalid")
        telemetry.JOB_SUBMISSIONS.labels("refused", reason).inc()
    else:
        telemetry.JOB_SUBMISSIONS.labels("error", str(status)).inc()
