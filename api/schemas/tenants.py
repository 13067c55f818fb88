"""Tenants, API keys and the audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, Field

from api.schemas.common import _In
from ppml.services.audit import AuditAction, ObjectType
from ppml.services.tenants import Role


class TenantCreate(_In):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Tenant(BaseModel):
    id: str
    name: str
    created_at: datetime


class TenantPage(BaseModel):
    items: list[Tenant]
    next_page_token: str | None


ROLE_DESCRIPTION = (
    "owner: registers budgeted datasets, sets budgets, sees exact figures of its data; "
    "analyst: submits jobs, sees only differentially private releases, may register public data."
)


EXPIRES_DESCRIPTION = "When the key stops working (ISO-8601 with a time zone); null: never."


def _iso_text(value: Any) -> Any:
    # Timestamps travel as ISO-8601 text: a number (seconds since 1970?) is a mistake.
    if value is not None and not isinstance(value, str):
        raise ValueError("a timestamp must be an ISO-8601 string with a time zone")
    return value


IsoTimestamp = Annotated[AwareDatetime, BeforeValidator(_iso_text)]


class ApiKeyCreate(_In):
    role: Role = Field(default="owner", description=ROLE_DESCRIPTION)
    expires_at: IsoTimestamp | None = Field(
        default=None, description=EXPIRES_DESCRIPTION + " Must be in the future."
    )


class ApiKeyCreated(BaseModel):
    id: str
    tenant_id: str
    key: str = Field(description="The secret key. It is shown only once.")
    prefix: str = Field(description="The key's first characters, shown in key listings.")
    role: Role = Field(description=ROLE_DESCRIPTION)
    created_at: datetime
    expires_at: datetime | None = Field(description=EXPIRES_DESCRIPTION)


class ApiKey(BaseModel):
    """A key as listed: never the key itself nor its hash, only its first characters."""

    id: str
    tenant_id: str
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    role: Role = Field(description=ROLE_DESCRIPTION)
    created_at: datetime
    expires_at: datetime | None = Field(description=EXPIRES_DESCRIPTION)
    revoked_at: datetime | None = Field(description="When the key was revoked; null: it was not.")
    last_used_at: datetime | None = Field(
        description="When the key was last used, to the minute (recorded at most once a minute)."
    )


class ApiKeyPage(BaseModel):
    items: list[ApiKey]
    next_page_token: str | None


class AuditEvent(BaseModel):
    """Who did what to which object, and when (append-only)."""

    id: str = Field(description="Sorts by creation time; pass it as page_token to read on.")
    tenant_id: str | None
    actor_key_id: str | None = Field(description="The API key that acted; null: the admin.")
    actor_role: Literal["owner", "analyst", "admin"]
    action: AuditAction
    object_type: ObjectType
    object_id: str | None
    detail: dict[str, Any] = Field(description="Ids, formats and counts; never data values.")
    created_at: datetime


class AuditPage(BaseModel):
    items: list[AuditEvent]
    next_page_token: str | None
