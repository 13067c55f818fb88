"""Shared route helpers: error declarations for OpenAPI and page-size parsing."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query

from api.errors import PROBLEM_MEDIA_TYPE
from api.schemas import Problem

__all__ = ["PageToken", "errors"]


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
