"""What every body shares: strict input models and the problem document."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldProblem(BaseModel):
    """One invalid field of a request."""

    field: str = Field(description="The field, as a dotted path (training.learning_rate).")
    message: str = Field(description="What is wrong with it.")


class Problem(BaseModel):
    """An RFC 9457 problem document. The extension members below are typed; others vary by
    ``type`` (see its detail), and a member that does not apply is absent."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        examples=["/problems/budget-exceeded"],
        description="What went wrong, as a URI reference ending in a stable code.",
    )
    title: str = Field(description="A short summary of the problem type.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What happened here; never a value of the data.")
    field: str | None = Field(
        default=None, description="The request field at fault (422, some 409s), dotted."
    )
    errors: list[FieldProblem] | None = Field(
        default=None, description="Every invalid field of the request (422 validation-error)."
    )
    epsilon_remaining: float | None = Field(
        default=None, description="ε the dataset can still grant (409 budget-exceeded)."
    )
    epsilon_requested: float | None = Field(
        default=None, description="ε the job asked for (409 budget-exceeded)."
    )
    max_target_epsilon: float | None = Field(
        default=None,
        description="The largest target_epsilon of the same shape that would fit (409 "
        "budget-exceeded), or null when none would.",
    )
    limit: float | None = Field(
        default=None, description="The limit that was hit (413, 422 and 429 limits)."
    )
    retry_after: int | None = Field(
        default=None, description="Seconds to wait before retrying (429), as in Retry-After."
    )
