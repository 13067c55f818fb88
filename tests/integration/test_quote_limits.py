"""Issue #15, finding 4: quotes are rate-limited per tenant (a token bucket per API process):
a flood answers 429 with Retry-After, before any body is validated or priced, while other
tenants are answered; a cached quote changes once a job is admitted."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ppml.config import Settings
from tests.conftest import dp_job_spec, new_tenant, register_digits

BURST = 3
RATE = 0.01  # one token per 100 s: nothing refills while the test runs


@pytest.fixture
def settings(settings: Settings) -> Settings:
    limits = settings.limits.model_copy(update={"quotes_per_second": RATE, "quote_burst": BURST})
    return settings.model_copy(update={"limits": limits})


def test_a_tenant_flooding_quotes_gets_429_with_retry_after_and_others_are_answered(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange
    dataset_id = register_digits(client, tenant)
    other = new_tenant(client)
    other_dataset = register_digits(client, other)
    spec = dp_job_spec(dataset_id, epsilon=1.0, epochs=2)
    # act
    answers = [client.post("/v1/jobs/quote", json=spec, headers=tenant) for _ in range(BURST + 2)]
    invalid = client.post("/v1/jobs/quote", json={"nonsense": True}, headers=tenant)
    neighbour = client.post(
        "/v1/jobs/quote", json=dp_job_spec(other_dataset, epsilon=1.0, epochs=2), headers=other
    )
    # assert
    assert [a.status_code for a in answers] == [200] * BURST + [429] * 2
    for refused in [*answers[BURST:], invalid]:  # refused before the body is even validated
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert 1 <= int(refused.headers["retry-after"]) <= 100
        assert refused.json()["limit"] == RATE and refused.json()["burst"] == BURST
    assert neighbour.status_code == 200, neighbour.text
    # submissions are not quotes: the flooding tenant may still submit
    assert client.post("/v1/jobs", json=spec, headers=tenant).status_code == 202


def test_a_repeated_quote_changes_once_a_job_is_admitted(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange
    dataset_id = register_digits(client, tenant, epsilon=3.0)
    spec = dp_job_spec(dataset_id, epsilon=2.5, epochs=2)
    first = client.post("/v1/jobs/quote", json=spec, headers=tenant).json()
    again = client.post("/v1/jobs/quote", json=spec, headers=tenant).json()
    # act
    assert client.post("/v1/jobs", json=spec, headers=tenant).status_code == 202
    after = client.post("/v1/jobs/quote", json=spec, headers=tenant).json()
    # assert
    assert first == again and first["fits_budget"] is True
    assert after["fits_budget"] is False
    assert after["epsilon_remaining"] < first["epsilon_remaining"]
    assert after["compute"] == first["compute"]
