"""API keys' lifecycle: listing without secrets, revocation, expiry, last use, who may do what."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.auth import KEY_CACHE_TTL_S
from ppml.db.models import ApiKey
from ppml.db.session import Database
from tests.conftest import admin_headers, new_tenant_id

Headers = dict[str, str]


def _key(client: TestClient, tenant_id: str, **body: Any) -> dict[str, Any]:
    created = client.post(f"/v1/tenants/{tenant_id}/api-keys", json=body, headers=admin_headers())
    assert created.status_code == 201, created.text
    result: dict[str, Any] = created.json()
    return result


def _auth(key: dict[str, Any]) -> Headers:
    return {"Authorization": f"Bearer {key['key']}"}


def _listed(client: TestClient, headers: Headers, path: str = "/v1/api-keys") -> list[Any]:
    answer = client.get(path, headers=headers)
    assert answer.status_code == 200, answer.text
    items: list[Any] = answer.json()["items"]
    return items


def _refused_within(client: TestClient, headers: Headers, seconds: float) -> float:
    """Seconds until the key is refused (401), polling; fails after ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        status = client.get("/v1/datasets", headers=headers).status_code
        if status == 401:
            return time.monotonic() - started
        assert status == 200
        time.sleep(0.02)
    raise AssertionError(f"the key still worked after {seconds} s")


def test_listings_show_prefixes_and_dates_but_never_a_key_or_its_hash(client: TestClient) -> None:
    # arrange
    tenant_id = new_tenant_id(client)
    owner, analyst = _key(client, tenant_id), _key(client, tenant_id, role="analyst")
    # act
    by_owner = _listed(client, _auth(owner))  # its first use: last_used_at is set
    by_admin = _listed(client, admin_headers(), f"/v1/tenants/{tenant_id}/api-keys")
    # assert
    assert by_admin == by_owner
    assert [k["id"] for k in by_owner] == [analyst["id"], owner["id"]]  # newest first
    for listed, created in zip(by_owner, [analyst, owner], strict=True):
        assert set(listed) == {
            "id",
            "tenant_id",
            "prefix",
            "role",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
        }
        assert created["key"].startswith(listed["prefix"]) and len(listed["prefix"]) == 12
        assert created["prefix"] == listed["prefix"] and listed["tenant_id"] == tenant_id
        assert created["key"] not in str(by_owner) and listed["revoked_at"] is None


def test_a_key_revoked_by_the_admin_is_refused_within_a_second(client: TestClient) -> None:
    # arrange: the key is in use, so its principal is cached
    tenant_id = new_tenant_id(client)
    key = _key(client, tenant_id)
    assert client.get("/v1/datasets", headers=_auth(key)).status_code == 200
    # act
    path = f"/v1/tenants/{tenant_id}/api-keys/{key['id']}"
    revoked = client.delete(path, headers=admin_headers())
    waited = _refused_within(client, _auth(key), 1.0)
    again = client.delete(path, headers=admin_headers())
    # assert
    assert revoked.status_code == 204 and again.status_code == 204
    assert waited <= KEY_CACHE_TTL_S + 0.2
    listed = _listed(client, admin_headers(), f"/v1/tenants/{tenant_id}/api-keys")
    assert listed[0]["revoked_at"] is not None


def test_an_owner_revokes_its_tenants_keys_and_an_analyst_may_not(client: TestClient) -> None:
    # arrange
    tenant_id = new_tenant_id(client)
    owner, analyst = _key(client, tenant_id), _key(client, tenant_id, role="analyst")
    other_owner = _key(client, tenant_id)
    # act
    listing_by_analyst = client.get("/v1/api-keys", headers=_auth(analyst))
    revoke_by_analyst = client.delete(f"/v1/api-keys/{owner['id']}", headers=_auth(analyst))
    revoke_by_owner = client.delete(f"/v1/api-keys/{analyst['id']}", headers=_auth(owner))
    own_key = client.delete(f"/v1/api-keys/{other_owner['id']}", headers=_auth(other_owner))
    # assert
    assert listing_by_analyst.status_code == 403 and revoke_by_analyst.status_code == 403
    assert revoke_by_owner.status_code == 204 and own_key.status_code == 204
    _refused_within(client, _auth(analyst), 1.0)
    _refused_within(client, _auth(other_owner), 1.0)
    assert client.get("/v1/datasets", headers=_auth(owner)).status_code == 200
    revoked = {k["id"] for k in _listed(client, _auth(owner)) if k["revoked_at"] is not None}
    assert revoked == {analyst["id"], other_owner["id"]}


@pytest.mark.parametrize("role", ["owner", "analyst"])
def test_another_tenants_keys_are_404_to_its_keys_and_to_the_wrong_tenant_path(
    client: TestClient, role: str
) -> None:
    # arrange
    victim_tenant, stranger_tenant = new_tenant_id(client), new_tenant_id(client)
    victim = _key(client, victim_tenant)
    stranger = _key(client, stranger_tenant, role=role)
    # act
    by_stranger = client.delete(f"/v1/api-keys/{victim['id']}", headers=_auth(stranger))
    wrong_path = client.delete(
        f"/v1/tenants/{stranger_tenant}/api-keys/{victim['id']}", headers=admin_headers()
    )
    no_tenant = client.get("/v1/tenants/ten_missing/api-keys", headers=admin_headers())
    missing_key = client.delete("/v1/api-keys/key_missing", headers=_auth(stranger))
    # assert
    for answer in (by_stranger, wrong_path, no_tenant, missing_key):
        assert answer.status_code == 404, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
    assert client.get("/v1/datasets", headers=_auth(victim)).status_code == 200
    if role == "owner":
        assert [k["id"] for k in _listed(client, _auth(stranger))] == [stranger["id"]]


def test_a_key_stops_working_at_its_expiry(client: TestClient) -> None:
    # arrange
    tenant_id = new_tenant_id(client)
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    key = _key(client, tenant_id, expires_at=expires.isoformat())
    # act: used (and cached) until it expires
    assert client.get("/v1/datasets", headers=_auth(key)).status_code == 200
    waited = _refused_within(client, _auth(key), 3.0)
    refused_at = datetime.now(UTC)
    # assert
    assert key["expires_at"] is not None
    assert datetime.fromisoformat(key["expires_at"]) == expires
    assert expires <= refused_at < expires + timedelta(seconds=0.5), waited
    listed = _listed(client, admin_headers(), f"/v1/tenants/{tenant_id}/api-keys")
    assert listed[0]["expires_at"] == key["expires_at"]


@pytest.mark.parametrize(
    "expires_at",
    ["2020-01-01T00:00:00Z", "2099-01-01T00:00:00", "soon", 1893456000],
)
def test_an_expiry_in_the_past_or_without_a_zone_is_422(
    client: TestClient, expires_at: Any
) -> None:
    tenant_id = new_tenant_id(client)
    answer = client.post(
        f"/v1/tenants/{tenant_id}/api-keys",
        json={"expires_at": expires_at},
        headers=admin_headers(),
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "expires_at"
    assert _listed(client, admin_headers(), f"/v1/tenants/{tenant_id}/api-keys") == []


def test_last_used_at_moves_at_most_once_a_minute(client: TestClient, database: Database) -> None:
    # arrange
    tenant_id = new_tenant_id(client)
    key = _key(client, tenant_id)
    path = f"/v1/tenants/{tenant_id}/api-keys"
    assert _listed(client, admin_headers(), path)[0]["last_used_at"] is None
    # act: a first use records it; uses within the minute (past the cache) leave it
    client.get("/v1/datasets", headers=_auth(key))
    first = _listed(client, admin_headers(), path)[0]["last_used_at"]
    time.sleep(KEY_CACHE_TTL_S + 0.1)
    client.get("/v1/datasets", headers=_auth(key))
    unchanged = _listed(client, admin_headers(), path)[0]["last_used_at"]
    # a minute later (moved back in the database), the next lookup records it again
    earlier = datetime.now(UTC) - timedelta(minutes=2)
    with database.session(write=True) as session:
        session.execute(update(ApiKey).where(ApiKey.id == key["id"]).values(last_used_at=earlier))
    time.sleep(KEY_CACHE_TTL_S + 0.1)
    client.get("/v1/datasets", headers=_auth(key))
    moved = _listed(client, admin_headers(), path)[0]["last_used_at"]
    # assert
    assert first is not None and unchanged == first
    assert datetime.fromisoformat(moved) > datetime.fromisoformat(first)
