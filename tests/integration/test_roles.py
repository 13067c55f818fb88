"""API key roles: owners register budgeted data; analysts submit jobs and may add public data."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from api.deps import RequireOwner
from api.errors import install_error_handlers
from ppml.db.migrate import upgrade
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.services.tenants import Principal, hash_key, principal_for_key
from tests.conftest import (
    admin_headers,
    dp_job_spec,
    new_key,
    new_tenant,
    new_tenant_id,
    register_digits,
)
from tests.integration import ingest_helpers

Headers = dict[str, str]
BUDGET = {"epsilon": 8.0, "delta": 1e-5}


def _problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and {"type", "title", "detail"} <= body.keys()
    return body


def _datasets(client: TestClient, headers: Headers) -> list[str]:
    return [d["id"] for d in client.get("/v1/datasets", headers=headers).json()["items"]]


def _csv() -> bytes:
    rows = [f"{20 + i % 50},{i % 7 / 7:.3f},{'sick' if i % 3 else 'well'}" for i in range(200)]
    return ("age,dose,label\n" + "\n".join(rows) + "\n").encode()


def test_a_created_key_reports_its_role_and_no_body_means_owner(client: TestClient) -> None:
    # arrange
    tenant_id = new_tenant_id(client)
    path = f"/v1/tenants/{tenant_id}/api-keys"
    # act
    plain = client.post(path, headers=admin_headers())
    owner = client.post(path, json={"role": "owner"}, headers=admin_headers())
    analyst = client.post(path, json={"role": "analyst"}, headers=admin_headers())
    defaulted = client.post(path, json={}, headers=admin_headers())
    # assert
    assert [r.status_code for r in (plain, owner, analyst, defaulted)] == [201] * 4
    roles = [r.json()["role"] for r in (plain, owner, analyst, defaulted)]
    assert roles == ["owner", "owner", "analyst", "owner"]
    assert analyst.json()["tenant_id"] == tenant_id


@pytest.mark.parametrize("body", [{"role": "admin"}, {"role": "Owner"}, {"role": None}])
def test_an_unknown_role_is_422_naming_the_field(client: TestClient, body: dict[str, Any]) -> None:
    tenant_id = new_tenant_id(client)
    answer = client.post(f"/v1/tenants/{tenant_id}/api-keys", json=body, headers=admin_headers())
    assert _problem(answer, 422)["field"] == "role"


def test_an_analyst_registering_a_budgeted_dataset_gets_403_and_nothing_is_stored(
    client: TestClient, owner_and_analyst: tuple[Headers, Headers]
) -> None:
    # arrange
    owner, analyst = owner_and_analyst
    public_id = register_digits(client, owner, epsilon=None)
    body = {"name": "digits", "source": {"builtin": "digits"}, "privacy_budget": BUDGET}
    # act
    refused = client.post("/v1/datasets", json=body, headers=analyst)
    # assert
    problem = _problem(refused, 403)
    assert problem["type"].endswith("/forbidden") and problem["role"] == "analyst"
    assert "owner key" in problem["detail"]
    assert _datasets(client, analyst) == [public_id]


@pytest.mark.parametrize(
    "budget", [{"epsilon": 2.0, "delta": 1e-4}, {"epsilon": 2.0}, {"delta": 1e-4}]
)
def test_an_analyst_uploading_with_a_budget_gets_403_before_anything_is_stored(
    client: TestClient,
    owner_and_analyst: tuple[Headers, Headers],
    tmp_path: Path,
    budget: dict[str, float],
) -> None:
    # arrange
    _owner, analyst = owner_and_analyst
    form = {"name": "patients", "target": "label", **{k: str(v) for k, v in budget.items()}}
    # act
    refused = client.post(
        "/v1/datasets/upload", headers=analyst, data=form, files={"file": ("p.csv", _csv())}
    )
    # assert
    assert _problem(refused, 403)["role"] == "analyst"
    assert _datasets(client, analyst) == []
    data_dir = tmp_path / "data"
    stored = [p for p in data_dir.rglob("*") if p.is_file()] if data_dir.exists() else []
    assert [p for p in stored if p.suffix in {".npz", ".upload", ".csv", ".parquet"}] == []


def test_an_analyst_may_register_and_upload_public_data(
    client: TestClient, owner_and_analyst: tuple[Headers, Headers]
) -> None:
    # arrange
    owner, analyst = owner_and_analyst
    # act
    builtin_id = register_digits(client, analyst, epsilon=None)
    upload = ingest_helpers.upload(
        client,
        analyst,
        data={"name": "public", "target": "label"},
        files={"file": ("p.csv", _csv())},
    )
    # assert
    assert upload.status_code == 202 and upload.json()["status"] == "ready", upload.text
    assert upload.json()["privacy_budget"] is None
    # the tenant's data, whichever key registered it
    assert set(_datasets(client, owner)) == {builtin_id, upload.json()["id"]}


def test_an_analyst_quotes_submits_and_cancels_jobs_on_the_owners_budgeted_data(
    client: TestClient, owner_and_analyst: tuple[Headers, Headers]
) -> None:
    # arrange
    owner, analyst = owner_and_analyst
    dataset_id = register_digits(client, owner, epsilon=8.0)
    spec = dp_job_spec(dataset_id, epsilon=2.0)
    # act
    quote = client.post("/v1/jobs/quote", json=spec, headers=analyst)
    submitted = client.post("/v1/jobs", json=spec, headers=analyst)
    job_id = submitted.json()["id"]
    seen_by_owner = client.get(f"/v1/jobs/{job_id}", headers=owner)
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=analyst)
    # assert
    assert quote.status_code == 200 and quote.json()["fits_budget"] is True
    assert submitted.status_code == 202, submitted.text
    assert seen_by_owner.status_code == 200 and seen_by_owner.json()["dataset_id"] == dataset_id
    assert cancelled.status_code == 202
    for path in ("", "/budget", "/ledger"):
        assert client.get(f"/v1/datasets/{dataset_id}{path}", headers=analyst).status_code == 200
    assert [j["id"] for j in client.get("/v1/jobs", headers=analyst).json()["items"]] == [job_id]


@pytest.mark.parametrize("role", ["owner", "analyst"])
def test_another_tenants_objects_stay_404_for_both_roles(client: TestClient, role: str) -> None:
    # arrange
    owner = new_tenant(client)
    dataset_id = register_digits(client, owner)
    job_id = client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=owner).json()["id"]
    stranger = new_tenant(client, role=role)
    # act / assert
    for method, path in [
        ("GET", f"/v1/datasets/{dataset_id}"),
        ("GET", f"/v1/datasets/{dataset_id}/budget"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
    ]:
        _problem(client.request(method, path, headers=stranger), 404)
    _problem(client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=stranger), 404)


def test_require_owner_passes_an_owner_and_answers_403_to_an_analyst(
    client: TestClient, database: Database
) -> None:
    # arrange: a route of its own behind RequireOwner, on the same database
    tenant_id = new_tenant_id(client)
    owner, analyst = new_key(client, tenant_id, "owner"), new_key(client, tenant_id, "analyst")
    app = FastAPI()
    app.state.db = database
    install_error_handlers(app)

    @app.get("/v1/probe")
    async def probe(principal: RequireOwner) -> dict[str, str]:
        return {"tenant_id": principal.tenant_id, "role": principal.role}

    with TestClient(app) as probe_client:
        # act
        passed = probe_client.get("/v1/probe", headers=owner)
        refused = probe_client.get("/v1/probe", headers=analyst)
        missing = probe_client.get("/v1/probe")
    # assert
    assert passed.json() == {"tenant_id": tenant_id, "role": "owner"}
    problem = _problem(refused, 403)
    assert "analyst keys see only differentially private releases" in problem["detail"]
    _problem(missing, 401)


def test_keys_made_before_roles_become_owner_keys(empty_database_url: str) -> None:
    # arrange: a tenant and a key written at the first revision, before roles existed
    upgrade(empty_database_url, "f4f40aead129")
    key = "ppml_sk_" + secrets.token_urlsafe(32)
    engine = create_engine(empty_database_url)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_old', 'old', :now)"),
            {"now": "2026-11-30 00:00:00+00:00"},
        )
        conn.execute(
            text(
                "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at) "
                "VALUES ('key_old', 'ten_old', :hash, :prefix, :now)"
            ),
            {"hash": hash_key(key), "prefix": key[:12], "now": "2026-11-30 00:00:00+00:00"},
        )
    # act
    upgrade(empty_database_url)
    # assert
    with engine.connect() as conn:
        role = conn.scalar(text("SELECT role FROM api_keys WHERE id = 'key_old'"))
    engine.dispose()
    assert role == "owner"
    db = Database(empty_database_url)
    try:
        with db.read_one() as session:
            principal = principal_for_key(Repositories(session), key)
    finally:
        db.dispose()
    assert principal == Principal(tenant_id="ten_old", role="owner") and principal.is_owner
