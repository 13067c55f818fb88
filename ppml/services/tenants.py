"""Tenants and their API keys (keys are shown once and stored as SHA-256 hashes)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal, get_args

from ppml.db.models import ApiKey, Tenant, new_id
from ppml.db.repositories import Repositories
from ppml.errors import Conflict, Forbidden, InvalidInput, NotFound

__all__ = [
    "ROLES",
    "Principal",
    "Role",
    "create_api_key",
    "create_tenant",
    "hash_key",
    "principal_for_key",
    "require_owner",
    "tenant_for_key",
]

KEY_PREFIX = "ppml_sk_"

# An owner registers budgeted data, sets budgets and sees exact figures of its data; an
# analyst submits jobs and sees only differentially private releases (PRIVACY.md, "Roles").
Role = Literal["owner", "analyst"]
ROLES: tuple[str, ...] = get_args(Role)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a key acts for: its tenant and its role there."""

    tenant_id: str
    role: str

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
    return tenant


def create_api_key(
    repos: Repositories, *, tenant_id: str, role: str = "owner"
) -> tuple[ApiKey, str]:
    """A new key for the tenant; returns the row and the plaintext (shown once).

    Raises:
        InvalidInput: ``role`` is neither ``owner`` nor ``analyst``.
        NotFound: no such tenant.
    """
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}", field="role")
    if repos.tenant(tenant_id) is None:
        raise NotFound("tenant not found")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"),
        tenant_id=tenant_id,
        key_hash=hash_key(key),
        prefix=key[:12],
        role=role,
    )
    repos.add(row)
    return row, key


def principal_for_key(repos: Repositories, key: str) -> Principal | None:
    """The tenant and role of a plaintext key, or None when it is no valid key."""
    if not key.startswith(KEY_PREFIX):
        return None
    found = repos.principal_for_key_hash(hash_key(key))
    return None if found is None else Principal(tenant_id=found[0], role=found[1])


def tenant_for_key(repos: Repositories, key: str) -> str | None:
    principal = principal_for_key(repos, key)
    return None if principal is None else principal.tenant_id
