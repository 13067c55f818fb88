"""Jobs that ask for several GPUs, over HTTP: refused with a 422 that changes nothing."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import dp_job_spec, register_digits


@pytest.mark.parametrize("route", ["/v1/jobs/quote", "/v1/jobs"])
def test_more_gpus_than_the_limit_is_a_422_problem_and_reserves_nothing(
    client: TestClient, tenant: dict[str, str], route: str
) -> None:
    # arrange: the default limit is one GPU per job
    dataset_id = register_digits(client, tenant)
    before = client.get(f"/v1/datasets/{dataset_id}/budget", headers=tenant).json()
    spec = {**dp_job_spec(dataset_id, epochs=1), "resources": {"gpus": 2}}
    # act
    response = client.post(route, json=spec, headers=tenant)
    # assert
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["field"] == "resources.gpus" and problem["limit"] == 1
    assert client.get("/v1/jobs", headers=tenant).json()["items"] == []
    assert client.get(f"/v1/datasets/{dataset_id}/budget", headers=tenant).json() == before


def test_zero_gpus_is_a_422_before_any_pricing(client: TestClient, tenant: dict[str, str]) -> None:
    dataset_id = register_digits(client, tenant)
    spec = {**dp_job_spec(dataset_id, epochs=1), "resources": {"gpus": 0}}

    response = client.post("/v1/jobs", json=spec, headers=tenant)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert client.get("/v1/jobs", headers=tenant).json()["items"] == []
