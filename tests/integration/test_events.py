"""GET /v1/jobs/{id}/events: server-sent events read without a thread per follower."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from tests.conftest import dp_job_spec, new_tenant, register_digits


def _events(text: str) -> list[tuple[str, dict[str, object]]]:
    found = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((fields["event"], json.loads(fields["data"])))
    return found


def test_a_finished_jobs_stream_says_its_status_progress_and_end_then_closes(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange: a job cancelled while queued is terminal at once
    dataset_id = register_digits(client, tenant)
    job = client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=tenant).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant).status_code == 202
    # act
    response = client.get(f"/v1/jobs/{job['id']}/events", headers=tenant)
    # assert
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert [name for name, _ in events] == ["status", "progress", "end"]
    assert events[0][1] == {"status": "cancelled"}
    assert events[2][1]["id"] == job["id"] and events[2][1]["status"] == "cancelled"


def test_another_tenants_stream_is_not_found(client: TestClient, tenant: dict[str, str]) -> None:
    dataset_id = register_digits(client, tenant)
    job = client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=tenant).json()
    response = client.get(f"/v1/jobs/{job['id']}/events", headers=new_tenant(client))
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
