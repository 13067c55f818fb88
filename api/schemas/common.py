"""What every body shares: strict input models and the problem document."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """An RFC 9457 problem document; extension members vary by ``type``."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["/problems/budget-exceeded"])
    title: str
    status: int
    detail: str
