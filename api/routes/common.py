"""Shared route helpers: the routers' class, error declarations for OpenAPI and page-size
parsing."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Query
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from api.errors import PROBLEM_MEDIA_TYPE
from api.schemas import Problem
from ppml.errors import InvalidInput

__all__ = ["CheckedRoute", "PageToken", "Router", "errors"]


class CheckedRoute(APIRoute):
    """An ``APIRoute`` that answers 422 for a query parameter it does not declare (a typo
    must not pass silently), before it reads a body or solves a dependency.

    The route's own check, not an app-wide dependency: every route solved that dependency
    on every request, though most requests carry no query string at all.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.query_names = frozenset(param.alias for param in _query_params(self.dependant))

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw: bytes = scope.get("query_string", b"")
        if raw:  # most requests: nothing to check
            for name, _ in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
                if name not in self.query_names:
                    raise InvalidInput(f"unknown query parameter {name!r}", field=name)
        await super().handle(scope, receive, send)


def _query_params(dependant: Any) -> list[Any]:
    params = list(dependant.query_params)
    for sub in dependant.dependencies:
        params += _query_params(sub)
    return params


class Router(APIRouter):
    """An ``APIRouter`` that answers "no match" at once for a path outside its prefix.

    The app tries its routers in turn, and FastAPI matches a request against every route of
    each router it passes (a regular expression each), even where the router's prefix alone
    rules them all out: a poll of ``/v1/jobs/{id}`` went through some 30 routes of other
    prefixes, both on the way in and once more when the jobs router handled it. A route's
    path always begins with its router's prefix, so no match is lost. Its routes are
    :class:`CheckedRoute` objects.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, route_class=CheckedRoute, **kwargs)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path: str = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if self.prefix and not path.startswith(self.prefix):
            return Match.NONE, {}
        return super().matches(scope)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries declaring problem+json bodies for these statuses.

    400 (a body that cannot be decoded at all), 401, 422 and 503 (the database is down or
    saturated; retry after ``Retry-After`` seconds) can answer any operation.
    """
    statuses = tuple(sorted({400, 401, 422, 503, *statuses}))
    problem_schema = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {
        status: {
            "model": Problem,  # registers the schema under components
            "content": {PROBLEM_MEDIA_TYPE: problem_schema},
            "description": "Problem",
        }
        for status in statuses
    }


PageToken = Annotated[str | None, Query(max_length=64, description="From next_page_token.")]
# One page size for every list: fixed, so the OpenAPI document states it.
PageSize = Annotated[int, Query(ge=1, le=200, description="Items per page (at most 200).")]
DEFAULT_PAGE_SIZE = 50
