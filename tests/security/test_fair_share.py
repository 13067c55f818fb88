"""Issue #15, finding 4: one tenant's long job cannot starve another tenant's short one.

PostgreSQL + Redis + ``ppml serve --no-worker`` + a single ``ppml worker`` with a 2 s time
slice. Tenant A's long DP job holds the only worker; tenant B submits a short one. B's job
starts within A's time slice (plus the wait and a report), A's job yields at a report,
resumes from its checkpoint when B's is done, and is charged exactly once.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ppml.privacy import accounting as acc
from tests.conftest import REDIS_URL, dp_job_spec
from tests.integration.stack import (
    BIN,
    free_port,
    process,
    service_env,
    tenant_client,
    wait_for_status,
    wait_ready,
)

ADMIN = "fair-share-admin-token-0123456789"
SLICE_S, WAIT_S = 2.0, 0.5


@pytest.fixture
def one_worker(tmp_path: Path, pg_database_url: str) -> Iterator[tuple[str, Path]]:
    port = free_port()
    env = service_env(
        tmp_path / "data",
        PPML_ADMIN_TOKEN=ADMIN,
        PPML_DATABASE_URL=pg_database_url,
        PPML_BROKER_URL=REDIS_URL,
        PPML_WORKER__QUEUE=f"training-{secrets.token_hex(4)}",
        PPML_WORKER__TIME_SLICE_S=str(SLICE_S),
        PPML_WORKER__PREEMPT_AFTER_WAIT_S=str(WAIT_S),
        PPML_WORKER__REPORT_EVERY_STEPS="10",
    )
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    api_args = [str(BIN / "ppml"), "serve", "--no-worker", "--port", str(port)]
    with process(api_args, env, api_log) as api:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api, api_log)
        with process([str(BIN / "ppml"), "worker"], env, worker_log):
            yield base, worker_log


def _dataset(client: httpx.Client) -> str:
    body = {
        "name": "digits",
        "source": {"builtin": "digits"},
        "privacy_budget": {"epsilon": 20.0, "delta": 1e-5},
    }
    response = client.post("/v1/datasets", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _submit(client: httpx.Client, dataset_id: str, epochs: int) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=dp_job_spec(dataset_id, epsilon=5.0, epochs=epochs))
    assert response.status_code == 202, response.text
    return dict(response.json())


def _started_within(client: httpx.Client, job_id: str, timeout: float) -> float | None:
    """Seconds until the job left ``queued``, or None if it had not within ``timeout``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if client.get(f"/v1/jobs/{job_id}").json()["status"] != "queued":
            return time.monotonic() - began
        time.sleep(0.05)
    return None


def test_a_long_job_yields_the_only_worker_to_another_tenant_and_is_charged_once(
    one_worker: tuple[str, Path],
) -> None:
    # arrange: tenant A's long job (1 800 steps: many time slices, a fraction of the
    # suite's budget) runs on the only worker
    base, worker_log = one_worker
    a, b = tenant_client(base, ADMIN, "tenant-a"), tenant_client(base, ADMIN, "tenant-b")
    a_data, b_data = _dataset(a), _dataset(b)
    long_job = _submit(a, a_data, epochs=150)
    wait_for_status(a, long_job["id"], {"running"}, timeout=120)
    # act: tenant B submits a short job
    short_job = _submit(b, b_data, epochs=2)
    waited = _started_within(b, short_job["id"], timeout=60)
    # assert: B's job started within A's slice (plus the wait, a report and polling)
    print(f"B's job started after {waited} s (slice {SLICE_S} s)")
    assert waited is not None and waited < SLICE_S + WAIT_S + 2
    assert wait_for_status(b, short_job["id"], {"succeeded", "failed"})["status"] == "succeeded"
    # ... A's job yielded at a report, then resumed from its checkpoint and finished
    done = wait_for_status(a, long_job["id"], {"succeeded", "failed", "cancelled"}, timeout=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    log = worker_log.read_text()
    assert f"job {long_job['id']} preempted at step" in log
    assert f"job {long_job['id']} claimed (attempt 2), starting at step 0" not in log
    # ... and charged exactly once, for every planned step
    items = a.get(f"/v1/datasets/{a_data}/ledger", params={"page_size": 200}).json()["items"]
    entries = [e for e in items if e["job_id"] == long_job["id"]]
    assert sorted(e["kind"] for e in entries) == ["commit", "release", "reserve"]
    commit = next(e for e in entries if e["kind"] == "commit")
    assert acc.MechanismEvent.from_dict(commit["event"]).steps == done["privacy"]["steps_planned"]
    assert done["privacy"]["epsilon_spent"] <= done["privacy"]["target_epsilon"]
    assert a.get(f"/v1/datasets/{a_data}/budget").json()["epsilon_reserved"] == 0
