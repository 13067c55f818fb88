"""Tenants and their API keys (keys are shown once and stored as SHA-256 hashes)."""

from __future__ import annotations

import hashlib
import secrets

from ppml.db.models import ApiKey, Tenant, new_id
from ppml.db.repositories import Repositories
from ppml.errors import Conflict, NotFound

__all__ = ["create_api_key", "create_tenant", "hash_key", "tenant_for_key"]

KEY_PREFIX = "ppml_sk_"


def hash_key(key: str) -> str:
    # Keys are 256-bit random strings, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(repos: Repositories, *, name: str) -> Tenant:
    if repos.tenant_by_name(name) is not None:
        raise Conflict(f"a tenant named {name!r} already exists")
    tenant = Tenant(id=new_id("ten"), name=name)
    repos.add(tenant)
    return tenant


def create_api_key(repos: Repositories, *, tenant_id: str) -> tuple[ApiKey, str]:
    """A new key for the tenant; returns the row and the plaintext (shown once)."""
    if repos.tenant(tenant_id) is None:
        raise NotFound("tenant not found")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:12])
    repos.add(row)
    return row, key


def tenant_for_key(repos: Repositories, key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    return repos.tenant_id_for_key_hash(hash_key(key))
