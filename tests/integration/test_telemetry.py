"""Operators' metrics and logs through a real ``ppml serve`` with two API processes and its
embedded worker: /metrics behind the admin token, every process's samples added up, latency
by route template, admissions and refusals, training steps from the worker, and one request
id from a submit into the worker's JSON log lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from tests.conftest import dp_job_spec, register_digits
from tests.integration.stack import embedded_serve, tenant_client, wait_for_status

ADMIN = "telemetry-admin-token-0123456789"


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_logs_and_request_ids_across_api_processes_and_the_worker(
    tmp_path: Path,
) -> None:
    with embedded_serve(tmp_path, ADMIN, "--workers", "2") as (base, _proc):
        client = tenant_client(base, ADMIN)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        # act: a job admitted (with a request id), one refused by the budget, polls by id
        dataset = register_digits(client, {}, epsilon=3.0)
        submitted = client.post(
            "/v1/jobs",
            json=dp_job_spec(dataset, epsilon=2.0, epochs=2),
            headers={"X-Request-ID": "rid-telemetry-0001"},
        )
        refused = client.post("/v1/jobs", json=dp_job_spec(dataset, epsilon=2.5))
        job_id = submitted.json()["id"]
        for _ in range(20):  # new connections, spread over both API processes
            assert httpx.get(f"{base}/v1/jobs/{job_id}", headers=client.headers).is_success
        wait_for_status(client, job_id, {"succeeded"})
        generated = httpx.get(f"{base}/healthz").headers["x-request-id"]
        unsafe = httpx.get(f"{base}/healthz", headers={"X-Request-ID": "a b\tc"})
        anonymous = httpx.get(f"{base}/metrics")
        as_tenant = httpx.get(f"{base}/metrics", headers=client.headers)
        text = httpx.get(f"{base}/metrics", headers=admin).text
    log = (tmp_path / "serve.log").read_text()

    # assert: only the admin token reads metrics
    assert anonymous.status_code == 401 and as_tenant.status_code == 401
    assert anonymous.headers["content-type"].startswith("application/problem+json")
    # latency by route template, every request counted whichever process served it
    polls = _sample(
        text, "ppml_http_request_duration_seconds_count", route="/v1/jobs/{job_id}", status="200"
    )
    assert polls >= 20
    assert job_id not in text and "/v1/jobs/job_" not in text
    # admissions and refusals; training throughput from the worker; state read at scrape
    assert submitted.status_code == 202 and refused.status_code == 409
    assert _sample(text, "ppml_job_submissions_total", outcome="admitted") == 1
    assert _sample(text, "ppml_job_submissions_total", outcome="refused", reason="budget") == 1
    assert _sample(text, "ppml_training_steps_total") > 0
    assert _sample(text, "ppml_jobs", status="succeeded") == 1
    assert "ppml_queue_depth 0.0" in text
    # request ids: echoed, generated when absent or unsafe, and in the worker's log lines
    assert submitted.headers["x-request-id"] == "rid-telemetry-0001"
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert unsafe.headers["x-request-id"] != "a b\tc"
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    traced = [r for r in records if r.get("request_id") == "rid-telemetry-0001"]
    assert any(r.get("job_id") == job_id and r["logger"].startswith("worker") for r in traced)
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
