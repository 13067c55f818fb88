"""The node's side of the Node API (``/v1/node/*``): outbound HTTPS only, and patient.

Connection errors, timeouts, 5xx and 429 answers are retried with exponential backoff
(1, 2, 4, ... 30 s, each with jitter, reset by the next answer), so a node rides out a server
restart or a network outage and carries on where it was. Any other answer is returned to the
caller, which decides (a 401 ends the node, a 409 drops a task).

Requests carry the node's credential, the schema check, refusals and updates: never a row.
Every request the node sends is written to its log with the size of its body ("sent POST
/v1/node/tasks/…/update: 2716 bytes"), so its operator can see all that left the machine.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["Backoff", "NodeApi"]

log = logging.getLogger(__name__)

POLL_WAIT_S = 25
_READ_MARGIN_S = 15  # a long poll's read timeout: the wait plus this


@dataclass
class Backoff:
    """Delays ``first · 2^k`` capped at ``cap``, each scaled by a uniform draw in
    ``[1 − jitter, 1]`` (nodes restarted together do not come back in step)."""

    first: float = 1.0
    cap: float = 30.0
    jitter: float = 0.5
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * 2.0**self.failures)
        self.failures = min(self.failures + 1, 32)
        return float(delay * (1.0 - self.jitter * self.rng.random()))

    def reset(self) -> None:
        self.failures = 0


class NodeApi:
    """A client of ``/v1/node/*``."""

    def __init__(
        self,
        server: str,
        *,
        credential: str | None = None,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.credential = credential
        self.backoff = backoff or Backoff()
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.server,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            event_hooks={"request": [_log_sent]},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> NodeApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the protocol -----------------------------------------------------------------
    def schema(self, token: str) -> httpx.Response:
        return self.request("POST", "/v1/node/schema", json={"enrolment_token": token}, auth=False)

    def enrol(self, token: str, version: str, check: dict[str, Any]) -> httpx.Response:
        body = {"enrolment_token": token, "software_version": version, "schema_check": check}
        return self.request("POST", "/v1/node/enrol", json=body, auth=False)

    def hello(self, version: str, check: dict[str, Any]) -> httpx.Response:
        body = {"software_version": version, "schema_check": check}
        return self.request("POST", "/v1/node/hello", json=body)

    def poll(self, wait_s: int = POLL_WAIT_S) -> httpx.Response:
        return self.request(
            "POST",
            "/v1/node/poll",
            json={"wait_s": wait_s},
            timeout=httpx.Timeout(30.0, read=wait_s + _READ_MARGIN_S),
        )

    def weights(self, task_id: str) -> httpx.Response:
        return self.request("GET", f"/v1/node/tasks/{task_id}/weights")

    def upload(self, task_id: str, body: bytes) -> httpx.Response:
        return self.request(
            "POST",
            f"/v1/node/tasks/{task_id}/update",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )

    def refuse(self, task_id: str, reason: str, message: str) -> httpx.Response:
        body = {"reason": reason, "message": message}
        return self.request("POST", f"/v1/node/tasks/{task_id}/refuse", json=body)

    # --- transport --------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        auth: bool = True,
        timeout: httpx.Timeout | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send until the server answers something other than 5xx or 429; return that."""
        headers = dict(kwargs.pop("headers", None) or {})
        if auth and self.credential is not None:
            headers["Authorization"] = f"Bearer {self.credential}"
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        while True:
            try:
                response = self._http.request(method, path, headers=headers, **kwargs, **extra)
            except httpx.TransportError as exc:
                self._wait(f"{method} {path}: {type(exc).__name__}", None)
                continue
            if response.status_code >= 500 or response.status_code == 429:
                self._wait(f"{method} {path}: HTTP {response.status_code}", response)
                continue
            self.backoff.reset()
            return response

    def _wait(self, what: str, response: httpx.Response | None) -> None:
        delay = self.backoff.next_delay()
        retry_after = _retry_after(response)
        if retry_after is not None:
            delay = min(max(delay, retry_after), self.backoff.cap)
        log.warning("%s; retrying in %.1f s", what, delay)
        self._sleep(delay)


def _log_sent(request: httpx.Request) -> None:
    """The node's record of what it sends: each request's method, path and body size."""
    log.info("sent %s %s: %d bytes", request.method, request.url.path, len(request.content))


def _retry_after(response: httpx.Response | None) -> float | None:
    if response is None:
        return None
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def problem_detail(response: httpx.Response) -> str:
    """A problem+json answer's ``detail`` (or its title, or the status)."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or f"HTTP {response.status_code}")
    return f"HTTP {response.status_code}"
