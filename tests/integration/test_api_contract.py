"""HTTP behaviour of the API on both databases: errors, idempotency, pagination, refusals."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import admin_headers, dp_job_spec, new_tenant, register_digits


def _assert_problem(response: Any, status: int, *, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    if field is not None:
        assert body["field"] == field
    return body


def _count_jobs(client: TestClient, headers: dict[str, str]) -> int:
    return len(client.get("/v1/jobs", headers=headers).json()["items"])


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"training": {"epochs": -1, "batch_size": 64, "learning_rate": 0.5}}, "training.epochs"),
        (
            {"training": {"epochs": 1, "batch_size": 100000, "learning_rate": 0.5}},
            "training.batch_size",
        ),
        ({"model": {"arch": "transformer"}}, "model.arch"),
        ({"privacy": {"target_epsilon": 0}}, "privacy.target_epsilon"),
        ({"privacy": {"target_epsilon": -1.0}}, "privacy.target_epsilon"),
        ({"privacy": {"target_epsilon": 1.0, "delta": 0.01}}, "privacy.delta"),
        ({"privacy": {"target_epsilon": 1.0, "sampling": "shuffle"}}, "privacy.sampling"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_bad_job_specs_are_422_naming_the_field_and_store_nothing(
    client: TestClient, tenant: dict[str, str], patch: dict[str, Any], field: str
) -> None:
    # arrange
    dataset_id = register_digits(client, tenant)
    spec = {**dp_job_spec(dataset_id), **patch}
    # act
    response = client.post("/v1/jobs", json=spec, headers=tenant)
    # assert
    _assert_problem(response, 422, field=field)
    assert _count_jobs(client, tenant) == 0
    assert client.get(f"/v1/datasets/{dataset_id}/ledger", headers=tenant).json()["items"] == []


def test_unknown_dataset_in_a_job_is_404(client: TestClient, tenant: dict[str, str]) -> None:
    response = client.post("/v1/jobs", json=dp_job_spec("ds_missing"), headers=tenant)
    _assert_problem(response, 404)


def test_delta_at_or_above_one_over_n_is_refused_at_registration(
    client: TestClient, tenant: dict[str, str]
) -> None:
    body = {
        "name": "d",
        "source": {"builtin": "digits"},
        "privacy_budget": {"epsilon": 1, "delta": 1e-3},
    }
    problem = _assert_problem(client.post("/v1/datasets", json=body, headers=tenant), 422)
    assert problem["field"] == "privacy_budget.delta" and "1/n" in problem["detail"]
    assert client.get("/v1/datasets", headers=tenant).json()["items"] == []


def test_privacy_budget_must_be_stated_explicitly(
    client: TestClient, tenant: dict[str, str]
) -> None:
    body = {"name": "d", "source": {"builtin": "digits"}}
    _assert_problem(
        client.post("/v1/datasets", json=body, headers=tenant), 422, field="privacy_budget"
    )


def test_non_private_job_runs_only_on_public_data(
    client: TestClient, tenant: dict[str, str]
) -> None:
    private = register_digits(client, tenant)
    public = register_digits(client, tenant, epsilon=None)
    spec = {**dp_job_spec(private), "privacy": None}
    refused = client.post("/v1/jobs", json=spec, headers=tenant)
    accepted = client.post("/v1/jobs", json={**spec, "dataset_id": public}, headers=tenant)
    assert _assert_problem(refused, 409)["type"].endswith("privacy-required")
    assert accepted.status_code == 202
    assert _assert_problem(client.get(f"/v1/datasets/{public}/budget", headers=tenant), 404)


def test_auth_is_required_and_admin_routes_need_the_admin_token(client: TestClient) -> None:
    tenant = new_tenant(client)
    _assert_problem(client.get("/v1/jobs"), 401)
    _assert_problem(client.get("/v1/jobs", headers={"Authorization": "Bearer nope"}), 401)
    _assert_problem(client.post("/v1/tenants", json={"name": "x"}, headers=tenant), 401)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    _assert_problem(client.get("/metrics"), 401)  # for operators: the admin token
    _assert_problem(client.get("/metrics", headers=tenant), 401)
    assert "# TYPE ppml_jobs gauge" in client.get("/metrics", headers=admin_headers()).text


def test_tenant_names_are_unique(client: TestClient) -> None:
    client.post("/v1/tenants", json={"name": "dup"}, headers=admin_headers())
    again = client.post("/v1/tenants", json={"name": "dup"}, headers=admin_headers())
    _assert_problem(again, 409)


def test_idempotency_key_replays_the_same_job_without_a_second_charge(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange
    dataset_id = register_digits(client, tenant)
    spec = dp_job_spec(dataset_id, epsilon=2.0)
    headers = {**tenant, "Idempotency-Key": "abc-1"}
    # act
    first = client.post("/v1/jobs", json=spec, headers=headers)
    second = client.post("/v1/jobs", json=spec, headers=headers)
    other = client.post("/v1/jobs", json=dp_job_spec(dataset_id, epsilon=1.0), headers=headers)
    # assert
    assert first.status_code == 202 and second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    _assert_problem(other, 422, field="Idempotency-Key")
    ledger = client.get(f"/v1/datasets/{dataset_id}/ledger", headers=tenant).json()["items"]
    assert [entry["kind"] for entry in ledger] == ["reserve"]
    # the key is scoped per tenant: another tenant may use it freely
    stranger = new_tenant(client)
    own = register_digits(client, stranger)
    theirs = client.post(
        "/v1/jobs", json=dp_job_spec(own), headers={**stranger, "Idempotency-Key": "abc-1"}
    )
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def test_quote_reserves_nothing_and_says_whether_the_job_fits(
    client: TestClient, tenant: dict[str, str]
) -> None:
    dataset_id = register_digits(client, tenant, epsilon=2.0)
    fits = client.post(
        "/v1/jobs/quote", json=dp_job_spec(dataset_id, epsilon=1.0), headers=tenant
    ).json()
    too_big = client.post(
        "/v1/jobs/quote", json=dp_job_spec(dataset_id, epsilon=1.99), headers=tenant
    ).json()
    assert (
        fits["fits_budget"] is True
        and 0.99 < fits["epsilon"] <= 1.0
        and fits["noise_multiplier"] > 0
    )
    assert too_big["fits_budget"] is False
    assert 0 < too_big["max_target_epsilon"] < 1.99
    budget = client.get(f"/v1/datasets/{dataset_id}/budget", headers=tenant).json()
    assert budget["epsilon_reserved"] == 0 and budget["epsilon_spent"] == 0
    # the suggested largest epsilon is admitted
    suggested = dp_job_spec(dataset_id, epsilon=too_big["max_target_epsilon"])
    assert client.post("/v1/jobs", json=suggested, headers=tenant).status_code == 202


def test_cancel_of_a_queued_job_releases_its_reservation(
    client: TestClient, tenant: dict[str, str]
) -> None:
    dataset_id = register_digits(client, tenant)
    job = client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=tenant).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant)
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    _assert_problem(again, 409)
    budget = client.get(f"/v1/datasets/{dataset_id}/budget", headers=tenant).json()
    assert budget["epsilon_reserved"] == 0 and budget["epsilon_spent"] == 0
    kinds = [
        e["kind"]
        for e in client.get(f"/v1/datasets/{dataset_id}/ledger", headers=tenant).json()["items"]
    ]
    assert kinds == ["reserve", "release"]
    _assert_problem(client.get(f"/v1/jobs/{job['id']}/model", headers=tenant), 409)


def test_lists_paginate_and_filter(client: TestClient, tenant: dict[str, str]) -> None:
    dataset_id = register_digits(client, tenant, epsilon=None)
    spec = {**dp_job_spec(dataset_id), "privacy": None}
    ids = {client.post("/v1/jobs", json=spec, headers=tenant).json()["id"] for _ in range(5)}
    seen: list[str] = []
    token = None
    while True:
        params: dict[str, Any] = {"page_size": 2}
        if token:
            params["page_token"] = token
        page = client.get("/v1/jobs", params=params, headers=tenant).json()
        seen += [job["id"] for job in page["items"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert len(seen) == 5 and set(seen) == ids
    assert seen == sorted(seen, reverse=True)  # newest first
    queued = client.get(
        "/v1/jobs", params={"status": "queued", "dataset_id": dataset_id}, headers=tenant
    )
    assert len(queued.json()["items"]) == 5
    assert (
        client.get("/v1/jobs", params={"status": "running"}, headers=tenant).json()["items"] == []
    )
    _assert_problem(
        client.get("/v1/jobs", params={"page_size": 0}, headers=tenant), 422, field="page_size"
    )
    _assert_problem(
        client.get("/v1/jobs", params={"status": "bogus"}, headers=tenant), 422, field="status"
    )


def test_unknown_routes_and_methods_answer_problems(
    client: TestClient, tenant: dict[str, str]
) -> None:
    _assert_problem(client.get("/v1/nothing", headers=tenant), 404)
    _assert_problem(client.delete("/v1/jobs", headers=tenant), 405)


def test_a_budget_adds_up_and_every_quote_says_the_largest_target(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange: one job admitted (reserved, or spent if a worker already ran it)
    dataset_id = register_digits(client, tenant, epsilon=4.0)
    submitted = client.post("/v1/jobs", json=dp_job_spec(dataset_id, epsilon=1.0), headers=tenant)
    assert submitted.status_code == 202
    # act
    budget = client.get(f"/v1/datasets/{dataset_id}/budget", headers=tenant).json()
    quote = client.post(
        "/v1/jobs/quote", json=dp_job_spec(dataset_id, epsilon=0.5), headers=tenant
    ).json()
    # assert: the three figures are in one unit and add up to the total
    parts = budget["epsilon_spent"] + budget["epsilon_reserved"] + budget["epsilon_remaining"]
    assert parts == pytest.approx(budget["epsilon_total"], abs=1e-12)
    assert budget["epsilon_spent"] + budget["epsilon_reserved"] > 0.99
    assert budget["admission_filter"] == "anchored-v1" and budget["filter_anchor_order"] > 1
    # a quote that fits still carries the largest target of its shape, above its own ε
    assert quote["fits_budget"] is True and quote["max_target_epsilon"] > 1.0
