"""ASGI guards on requests before any route runs: body sizes, NUL characters, nosniff."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import problem

__all__ = ["MULTIPART_SLACK", "BodySizeLimit", "NoSniff", "NulGuard", "RouteLimit"]

# Multipart framing and form fields ride along with an uploaded file: allow some slack.
MULTIPART_SLACK = 64 * 1024


@dataclass(frozen=True, slots=True)
class RouteLimit:
    """A body limit of its own for the requests of one route (and, if given, one media type)."""

    method: str
    path: str  # a regular expression matched against the whole path
    max_bytes: int
    media_type: str | None = None  # e.g. "multipart/form-data"; None: any

    def matches(self, scope: Scope) -> bool:
        if scope["method"] != self.method or not re.fullmatch(self.path, scope["path"]):
            return False
        return self.media_type is None or _content_type(scope).startswith(self.media_type)


class BodySizeLimit:
    """413 on a declared ``Content-Length`` over the limit, or as soon as streamed bytes pass it.

    The limit is ``max_bytes`` unless a :class:`RouteLimit` matches the request. When a
    streamed body passes the limit, the guard answers 413 itself and tells the app the client
    went away, so no parser wraps the refusal into another error; whatever the app sends
    afterwards is dropped.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, routes: Sequence[RouteLimit] = ()) -> None:
        self.app, self.max_bytes, self.routes = app, max_bytes, tuple(routes)

    def limit(self, scope: Scope) -> int:
        """The body limit of this request."""
        for route in self.routes:
            if route.matches(scope):
                return route.max_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not _may_have_body(scope):  # a GET, say: no byte to count
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(limit)(scope, receive, send)
            return
        seen = 0

        async def too_large(message: Message) -> Response | None:
            nonlocal seen
            seen += len(message.get("body", b""))
            return _too_large(limit) if seen > limit else None

        await _refusing(self.app, scope, receive, send, too_large)


def _too_large(limit: int) -> Response:
    response = problem(
        413,
        "payload-too-large",
        "Payload too large",
        f"request bodies of this route are limited to {limit} bytes",
        extra={"limit": limit},
    )
    response.headers["Connection"] = "close"
    return response


def _may_have_body(scope: Scope) -> bool:
    """False only for a request that declares no body: neither ``Transfer-Encoding`` nor a
    ``Content-Length`` other than 0 (HTTP/1.1 then allows none to follow)."""
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class NulGuard:
    """422 for a NUL character in the path, the query or a JSON body, before any route runs.

    PostgreSQL cannot store NUL in text, so such input must be refused as invalid rather
    than fail at the database. Multipart bodies carry binary files and are not scanned: their
    text fields are checked where they are parsed (``ppml.datasets``, the upload form).
    """

    _ESCAPE = b"\\u0000"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        field = _nul_in_url(scope)
        if field is not None:
            await _nul_problem(field)(scope, receive, send)
            return
        if not _is_json(scope):
            await self.app(scope, receive, send)
            return
        tail = b""

        async def holds_nul(message: Message) -> Response | None:
            nonlocal tail
            chunk = tail + message.get("body", b"")
            tail = chunk[-(len(self._ESCAPE) - 1) :]
            if self._ESCAPE in chunk.lower() or b"\x00" in chunk:
                return _nul_problem("body")
            return None

        await _refusing(self.app, scope, receive, send, holds_nul)


async def _refusing(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    inspect: Callable[[Message], Awaitable[Response | None]],
) -> None:
    """Run ``app``, showing ``inspect`` every body chunk as it streams in.

    When ``inspect`` answers a response (before the app started its own), the guard sends it
    and tells the app the client went away, so no parser wraps the refusal into another
    error; whatever the app sends afterwards is dropped.
    """
    started = refused = False

    async def inspecting_receive() -> Message:
        nonlocal refused
        if refused:
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.request" and not started:
            refusal = await inspect(message)
            if refusal is not None:
                refused = True
                await refusal(scope, receive, send)
                return {"type": "http.disconnect"}
        return message

    async def guarded_send(message: Message) -> None:
        nonlocal started
        if refused:
            return
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    await app(scope, inspecting_receive, guarded_send)


def _nul_in_url(scope: Scope) -> str | None:
    if "\x00" in scope.get("path", ""):
        return "path"
    raw = scope.get("query_string", b"")
    if not raw:  # most requests: no query to parse
        return None
    query = raw.decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return name.replace("\x00", "") or "query"
    return None


def _content_type(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return str(value.decode("latin-1")).strip().lower()
    return ""


def _is_json(scope: Scope) -> bool:
    return "json" in _content_type(scope)


def _nul_problem(field: str) -> Response:
    return problem(
        422,
        "invalid-input",
        "Invalid input",
        "NUL characters are not allowed in text",
        extra={"field": field},
    )


class NoSniff:
    """Every response says ``X-Content-Type-Options: nosniff``: browsers must not guess."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_header if scope["type"] == "http" else send)
