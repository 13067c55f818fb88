"""Hostile input: NUL characters answer 422 on both backends and change nothing (PostgreSQL
cannot store them in text; they used to answer 500), numbers must be numbers, and responses
carry the headers that keep browsers from guessing or caching secrets."""

from __future__ import annotations

import io

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import admin_headers, dp_job_spec, register_digits
from tests.integration import ingest_helpers


def _assert_422(response: httpx.Response, field: str) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == field


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/jobs?dataset_id=ds%00x", "dataset_id"),
        ("/v1/jobs?page_token=a%00", "page_token"),
        ("/v1/jobs/job_%00", "path"),
        ("/v1/datasets/ds_%00/budget", "path"),
    ],
)
def test_nul_in_the_url_is_a_422(
    client: TestClient, tenant: dict[str, str], path: str, field: str
) -> None:
    _assert_422(client.get(path, headers=tenant), field)


def test_nul_in_a_json_body_is_a_422_and_creates_nothing(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange
    dataset_id = register_digits(client, tenant)
    spec = {**dp_job_spec(dataset_id), "name": "evil\u0000name"}
    body = {"name": "d\u0000", "source": {"builtin": "digits"}, "privacy_budget": None}
    # act / assert
    _assert_422(client.post("/v1/jobs", json=spec, headers=tenant), "body")
    _assert_422(client.post("/v1/datasets", json=body, headers=tenant), "body")
    assert client.get("/v1/jobs", headers=tenant).json()["items"] == []
    assert len(client.get("/v1/datasets", headers=tenant).json()["items"]) == 1


def test_nul_in_an_upload_name_or_label_is_a_422_and_stores_nothing(
    client: TestClient, tenant: dict[str, str]
) -> None:
    rows = "a,b,label\n" + "".join(f"{i},{i % 3},{'x' if i % 2 else 'y'}\n" for i in range(40))
    bad_label = rows.replace("y\n", "y\x00z\n", 1)
    named = client.post(
        "/v1/datasets/upload",
        headers=tenant,
        data={"name": "p\x00", "target": "label"},
        files={"file": ("d.csv", io.BytesIO(rows.encode()))},
    )
    labelled = ingest_helpers.upload(
        client,
        tenant,
        data={"name": "p", "target": "label"},
        files={"file": ("d.csv", io.BytesIO(bad_label.encode()))},
    )
    _assert_422(named, "name")
    # a label is data: the worker finds it, and the dataset is invalid for that reason
    assert labelled.json()["status"] == "invalid", labelled.text
    assert labelled.json()["problem"]["field"] == "target"
    listed = client.get("/v1/datasets", headers=tenant).json()["items"]
    assert [d["status"] for d in listed] == ["invalid"]


def test_numbers_are_numbers_on_the_wire(client: TestClient, tenant: dict[str, str]) -> None:
    # "1.0" and true are not ε; a vanishing clipping norm or learning rate is refused too
    dataset_id = register_digits(client, tenant)
    base = dp_job_spec(dataset_id)
    for privacy in ({"target_epsilon": "1.0"}, {"target_epsilon": True}, {"max_grad_norm": 1e-300}):
        spec = {**base, "privacy": {**base["privacy"], **privacy}}
        assert client.post("/v1/jobs/quote", json=spec, headers=tenant).status_code == 422
    slow = {**base, "training": {**base["training"], "learning_rate": 1e-320}}
    assert client.post("/v1/jobs/quote", json=slow, headers=tenant).status_code == 422
    assert client.post("/v1/jobs/quote", json=base, headers=tenant).status_code == 200


def test_responses_say_nosniff_and_new_keys_are_not_cached(client: TestClient) -> None:
    tenant = client.post("/v1/tenants", json={"name": "sniff"}, headers=admin_headers()).json()
    key = client.post(f"/v1/tenants/{tenant['id']}/api-keys", headers=admin_headers())
    assert key.status_code == 201
    assert key.headers["cache-control"] == "no-store"
    assert key.headers["x-content-type-options"] == "nosniff"
    assert client.get("/healthz").headers["x-content-type-options"] == "nosniff"
