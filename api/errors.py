"""RFC 9457 problem documents for every error, rendered in one place."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ppml import errors
from ppml.db.session import UNAVAILABLE

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "error_response",
    "install_error_handlers",
    "problem",
    "unavailable_response",
]

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

_STATUS: list[tuple[type[errors.PPMLError], int]] = [
    (errors.NotFound, 404),
    (errors.PayloadTooLarge, 413),
    (errors.InvalidInput, 422),
    (errors.Conflict, 409),
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.TooManyRequests, 429),
    (errors.Gone, 410),
]

_HTTP_CODES = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}

RETRY_AFTER_S = 2  # what a 503 asks clients to wait before retrying


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """A problem+json response; ``extra`` members never override the standard ones."""
    body: dict[str, Any] = {
        "type": f"/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    body.update({k: v for k, v in (extra or {}).items() if k not in body})
    return JSONResponse(
        jsonable_encoder(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


def status_of(exc: errors.PPMLError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 400


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


async def _ppml_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.PPMLError)
    return error_response(exc)


def error_response(exc: errors.PPMLError) -> JSONResponse:
    """The problem document of a domain error (also for middleware, outside the handlers)."""
    status = status_of(exc)
    extra = dict(exc.extra)
    field = getattr(exc, "field", None)
    if field is not None:
        extra["field"] = field
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    if status == 429 and "retry_after" in extra:
        headers = {"Retry-After": str(int(extra["retry_after"]))}
    return problem(status, exc.code, exc.title, exc.detail, headers=headers, extra=extra)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {"field": _field_name(tuple(err.get("loc", ()))), "message": str(err.get("msg", ""))}
        for err in exc.errors()
    ]
    first = problems[0] if problems else {"field": "body", "message": "invalid request"}
    return problem(
        422,
        "validation-error",
        "Invalid request",
        f"{first['field']}: {first['message']}",
        extra={"field": first["field"], "errors": problems},
    )


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code, title = _HTTP_CODES.get(exc.status_code, ("http-error", "HTTP error"))
    return problem(
        exc.status_code, code, title, str(exc.detail), headers=getattr(exc, "headers", None)
    )


async def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
    return unavailable_response(exc)


def unavailable_response(exc: Exception) -> JSONResponse:
    """The 503 for a database that is unavailable (also for middleware)."""
    # Not the client's fault and not a bug: the database is down, restarting or saturated.
    # The unit of work rolled back; a submit whose COMMIT was cut off may still have landed,
    # which is what its Idempotency-Key is for on the retry.
    log.warning("database unavailable: %s: %s", exc.__class__.__name__, exc)
    return problem(
        503,
        "service-unavailable",
        "Service unavailable",
        "The database is unavailable; retry later.",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return problem(500, "internal-error", "Internal error", "An unexpected error occurred.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.PPMLError, _ppml_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for unavailable in UNAVAILABLE:
        app.add_exception_handler(unavailable, _unavailable)
    app.add_exception_handler(Exception, _unexpected)
