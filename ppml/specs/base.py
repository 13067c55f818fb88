"""The base of every job spec."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Spec"]


class Spec(BaseModel):
    """A part of a job spec: unknown fields are refused (a typo is a 422, never ignored)."""

    model_config = ConfigDict(extra="forbid")
