"""Tenants and their API keys (keys are shown once and stored as SHA-256 hashes)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, get_args

from ppml.db.models import ApiKey, Tenant, new_id, utcnow
from ppml.db.repositories import Page, Repositories
from ppml.errors import Conflict, Forbidden, InvalidInput, NotFound
from ppml.services import audit

__all__ = [
    "LAST_USED_EVERY",
    "ROLES",
    "Principal",
    "Role",
    "ValidKey",
    "check_key",
    "create_api_key",
    "create_tenant",
    "hash_key",
    "list_api_keys",
    "principal_for_key",
    "record_key_use",
    "require_owner",
    "revoke_api_key",
    "tenant_for_key",
]

# A key's last_used_at moves at most this often: a busy key costs no write per request.
LAST_USED_EVERY = timedelta(minutes=1)

KEY_PREFIX = "ppml_sk_"

# An owner registers budgeted data, sets budgets and sees exact figures of its data; an
# analyst submits jobs and sees only differentially private releases (PRIVACY.md, "Roles").
Role = Literal["owner", "analyst"]
ROLES: tuple[str, ...] = get_args(Role)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a key acts for: its tenant and its role there (and which key, for the audit
    trail: two keys of one tenant and role are the same principal)."""

    tenant_id: str
    role: str
    key_id: str | None = field(default=None, compare=False)

    @property
    def is_owner(self) -> bool:
        return self.role == "owner"


OWNER_ONLY = "this needs an owner key; analyst keys see only differentially private releases"


def require_owner(principal: Principal, detail: str = OWNER_ONLY) -> None:
    """Raises :class:`Forbidden` (naming the key's role) unless the key is an owner's."""
    if not principal.is_owner:
        raise Forbidden(detail, role=principal.role)


def hash_key(key: str) -> str:
    # Keys are 256-bit random strings, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(repos: Repositories, *, name: str) -> Tenant:
    if repos.tenant_by_name(name) is not None:
        raise Conflict(f"a tenant named {name!r} already exists")
    tenant = Tenant(id=new_id("ten"), name=name)
    repos.add(tenant)
    # Only the admin creates tenants (the admin token, or an operator in-process).
    audit.record(
        repos, None, "tenant.create", "tenant", tenant.id, {"name": name}, tenant_id=tenant.id
    )
    return tenant


def create_api_key(
    repos: Repositories,
    *,
    tenant_id: str,
    role: str = "owner",
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A new key for the tenant; returns the row and the plaintext (shown once).

    Args:
        expires_at: When the key stops working (timezone-aware); None: it never expires.

    Raises:
        InvalidInput: ``role`` is neither ``owner`` nor ``analyst``, or ``expires_at`` is
            naive or not in the future.
        NotFound: no such tenant.
    """
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}", field="role")
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise InvalidInput("expires_at needs a time zone (e.g. Z)", field="expires_at")
        if expires_at <= utcnow():
            raise InvalidInput("expires_at must be in the future", field="expires_at")
    if repos.tenant(tenant_id) is None:
        raise NotFound("tenant not found")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"),
        tenant_id=tenant_id,
        key_hash=hash_key(key),
        prefix=key[:12],
        role=role,
        expires_at=expires_at,
    )
    repos.add(row)
    detail = {"role": role, "expires_at": expires_at.isoformat() if expires_at else None}
    audit.record(repos, None, "key.create", "api_key", row.id, detail, tenant_id=tenant_id)
    return row, key


@dataclass(frozen=True, slots=True)
class ValidKey:
    """A key that may act now: for whom, until when, and whether to record its use."""

    id: str
    principal: Principal
    expires_at: datetime | None
    use_unrecorded: bool  # last_used_at is older than LAST_USED_EVERY (or unset)

    def valid_at(self, now: datetime) -> bool:
        return self.expires_at is None or now < self.expires_at


def check_key(repos: Repositories, key: str, *, now: datetime) -> ValidKey | None:
    """The key behind a plaintext, if it exists and is neither revoked nor expired at ``now``."""
    if not key.startswith(KEY_PREFIX):
        return None
    row = repos.api_key_by_hash(hash_key(key))
    if row is None or row.revoked_at is not None:
        return None
    valid = ValidKey(
        id=row.id,
        principal=Principal(tenant_id=row.tenant_id, role=row.role, key_id=row.id),
        expires_at=row.expires_at,
        use_unrecorded=row.last_used_at is None or row.last_used_at < now - LAST_USED_EVERY,
    )
    return valid if valid.valid_at(now) else None


def record_key_use(repos: Repositories, key_id: str, *, now: datetime) -> None:
    """Move the key's ``last_used_at`` to ``now``, unless it moved less than a minute ago."""
    repos.touch_api_key(key_id, now=now, not_since=now - LAST_USED_EVERY)


def principal_for_key(repos: Repositories, key: str) -> Principal | None:
    """The tenant and role of a plaintext key, or None when it is no valid key."""
    valid = check_key(repos, key, now=utcnow())
    return None if valid is None else valid.principal


def list_api_keys(
    repos: Repositories, *, tenant_id: str, page_size: int, page_token: str | None
) -> Page:
    """The tenant's keys, newest first, revoked and expired ones included.

    Raises:
        NotFound: no such tenant.
    """
    if repos.tenant(tenant_id) is None:
        raise NotFound("tenant not found")
    return repos.list_api_keys(tenant_id, page_size=page_size, page_token=page_token)


def revoke_api_key(
    repos: Repositories, *, tenant_id: str, key_id: str, by: Principal | None = None
) -> ApiKey:
    """Revoke one of the tenant's keys; revoking a revoked key changes nothing.

    Every API process refuses the key within a second of the commit (their key caches keep
    an entry at most that long; ``api.auth``).

    Args:
        by: The key asking, which must be an owner's of the tenant; None: the admin.

    Raises:
        NotFound: the tenant has no such key (checked first, so another tenant's key ids
            look missing to every role).
        Forbidden: ``by`` is an analyst's key.
    """
    row = repos.api_key(tenant_id, key_id)
    if row is None:
        raise NotFound("API key not found")
    if by is not None:
        require_owner(by, "only an owner key may revoke the tenant's keys")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit.record(
            repos, by, "key.revoke", "api_key", row.id, {"role": row.role}, tenant_id=tenant_id
        )
    return row


def tenant_for_key(repos: Repositories, key: str) -> str | None:
    principal = principal_for_key(repos, key)
    return None if principal is None else principal.tenant_id
