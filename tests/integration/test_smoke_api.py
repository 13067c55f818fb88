from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import dp_job_spec, register_digits


def test_over_budget_job_is_refused_with_remaining_budget(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange
    dataset_id = register_digits(client, tenant, epsilon=4.0)
    first = client.post("/v1/jobs", json=dp_job_spec(dataset_id, epsilon=3.0), headers=tenant)
    assert first.status_code == 202
    # act
    second = client.post("/v1/jobs", json=dp_job_spec(dataset_id, epsilon=3.0), headers=tenant)
    # assert
    assert second.status_code == 409
    assert second.headers["content-type"] == "application/problem+json"
    body = second.json()
    assert body["type"].endswith("budget-exceeded")
    assert 0 <= body["epsilon_remaining"] < 3.0
    assert body["epsilon_requested"] > 2.9
    # the refusal suggests the largest target ε of the same shape that would fit, and it does
    assert 0 < body["max_target_epsilon"] < 3.0
    suggested = dp_job_spec(dataset_id, epsilon=body["max_target_epsilon"])
    assert client.post("/v1/jobs", json=suggested, headers=tenant).status_code == 202
