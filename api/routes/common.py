"""Shared route helpers: error declarations for OpenAPI and page-size parsing."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query

from api.errors import PROBLEM_MEDIA_TYPE
from api.schemas import Problem

__all__ = ["PageToken", "errors", "page_size_param"]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries declaring problem+json bodies for these statuses.

    400 (a body that cannot be decoded at all), 401 and 422 can answer any operation.
    """
    statuses = tuple(sorted({400, 401, 422, *statuses}))
    return {
        status: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": "Problem"}
        for status in statuses
    }


PageToken = Annotated[str | None, Query(max_length=64, description="From next_page_token.")]


def page_size_param(default: int, maximum: int) -> Any:
    return Query(default, ge=1, le=maximum, description="Items per page.")
