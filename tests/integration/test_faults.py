"""Faults against real processes: a killed worker, a duplicated message, a broker restart.

Each test runs PostgreSQL, its own Redis server (so restarting it disturbs nothing else), the API
(`ppml serve --no-worker`) and `ppml worker` subprocesses with short leases.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ppml.config import Settings
from ppml.privacy import accounting as acc
from ppml.queue import RUN_JOB, make_celery
from tests.conftest import dp_job_spec
from tests.integration.stack import (
    BIN,
    free_port,
    process,
    service_env,
    stop,
    wait_for_status,
    wait_ready,
)
from tests.integration.test_stacks import ADMIN, _tenant_client

LEASE_S, REAPER_S = 3, 1


def _redis(port: int, log: Path) -> subprocess.Popen[bytes]:
    args = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(50):
        if (
            subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode
            == 0
        ):
            return proc
        time.sleep(0.1)
    raise RuntimeError("redis did not start")


@dataclass
class Stack:
    base: str
    env: dict[str, str]
    tmp: Path
    redis_port: int
    redis: subprocess.Popen[bytes]
    exits: ExitStack
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def worker(self) -> subprocess.Popen[bytes]:
        log = self.tmp / f"worker{len(self.workers)}.log"
        proc = self.exits.enter_context(process([str(BIN / "ppml"), "worker"], self.env, log))
        self.workers.append(proc)
        return proc

    def restart_redis(self) -> None:
        stop(self.redis, signal.SIGKILL)
        time.sleep(0.5)
        self.redis = _redis(self.redis_port, self.tmp / "redis.log")

    def send_again(self, job_id: str) -> None:
        settings = Settings(broker_url=self.env["PPML_BROKER_URL"], data_dir=self.tmp)
        settings.worker.queue = self.env["PPML_WORKER__QUEUE"]
        make_celery(settings).send_task(RUN_JOB, args=[job_id], queue=settings.worker.queue)


@pytest.fixture
def stack(tmp_path: Path, pg_database_url: str) -> Iterator[Stack]:
    redis_port, port = free_port(), free_port()
    redis = _redis(redis_port, tmp_path / "redis.log")
    env = service_env(
        tmp_path / "data",
        PPML_ADMIN_TOKEN=ADMIN,
        PPML_DATABASE_URL=pg_database_url,
        PPML_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
        PPML_WORKER__QUEUE=f"training-{secrets.token_hex(4)}",
        PPML_WORKER__LEASE_SECONDS=str(LEASE_S),
        PPML_WORKER__REAPER_INTERVAL_S=str(REAPER_S),
        PPML_WORKER__REPORT_EVERY_STEPS="10",
        PPML_WORKER__REQUEUE_AFTER_S="5",
    )
    with ExitStack() as exits:
        api_log = tmp_path / "api.log"
        api = exits.enter_context(
            process([str(BIN / "ppml"), "serve", "--no-worker", "--port", str(port)], env, api_log)
        )
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api, api_log)
        stack = Stack(base, env, tmp_path, redis_port, redis, exits)
        try:
            yield stack
        finally:
            exits.close()
            stop(stack.redis)


def _dataset(client: httpx.Client, epsilon: float = 50.0) -> str:
    body = {
        "name": "d",
        "source": {"builtin": "digits"},
        "privacy_budget": {"epsilon": epsilon, "delta": 1e-5},
    }
    response = client.post("/v1/datasets", json=body)
    assert response.status_code == 201
    return str(response.json()["id"])


def _ledger(client: httpx.Client, dataset_id: str, job_id: str) -> list[dict[str, Any]]:
    items = client.get(f"/v1/datasets/{dataset_id}/ledger", params={"page_size": 200}).json()[
        "items"
    ]
    return [entry for entry in items if entry["job_id"] == job_id]


def test_killed_worker_ends_the_job_with_one_commit_for_the_steps_it_may_have_run(
    stack: Stack,
) -> None:
    # arrange: one worker runs a long job
    client = _tenant_client(stack.base)
    dataset_id = _dataset(client)
    worker = stack.worker()
    job_id = client.post(
        "/v1/jobs", json=dp_job_spec(dataset_id, epsilon=10.0, epochs=1000)
    ).json()["id"]
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job_id}").json()["progress"]["steps"] < 20:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # act: kill -9 mid-epoch, then a fresh worker (whose reaper notices) comes up
    stop(worker, signal.SIGKILL)
    killed_at = time.monotonic()
    stack.worker()
    job = wait_for_status(client, job_id, {"failed", "succeeded"}, timeout=90)
    # assert
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    worker_start_slack = 30  # a new worker imports torch before its first reaper pass
    assert time.monotonic() - killed_at < LEASE_S + REAPER_S + worker_start_slack
    entries = _ledger(client, dataset_id, job_id)
    assert sorted(e["kind"] for e in entries) == ["commit", "release", "reserve"]
    commit = next(e for e in entries if e["kind"] == "commit")
    steps = commit["event"]["steps"]
    assert job["privacy"]["steps"] == steps >= 20
    event = acc.MechanismEvent.from_dict(commit["event"])
    assert job["privacy"]["epsilon_spent"] == pytest.approx(acc.epsilon(acc.rdp_curve(event), 1e-5))
    budget = client.get(f"/v1/datasets/{dataset_id}/budget").json()
    assert budget["epsilon_reserved"] == 0


def test_a_message_delivered_twice_trains_once_and_charges_once(stack: Stack) -> None:
    # arrange: two workers, one job, its message published a second time
    client = _tenant_client(stack.base)
    dataset_id = _dataset(client)
    stack.worker()
    stack.worker()
    job_id = client.post("/v1/jobs", json=dp_job_spec(dataset_id, epsilon=2.0, epochs=20)).json()[
        "id"
    ]
    # act
    stack.send_again(job_id)
    job = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=120)
    time.sleep(2)  # let the duplicate delivery finish on the other worker
    # assert
    assert job["status"] == "succeeded"
    entries = _ledger(client, dataset_id, job_id)
    assert sorted(e["kind"] for e in entries) == ["commit", "release", "reserve"]
    logs = "".join((stack.tmp / f"worker{i}.log").read_text() for i in range(2))
    assert logs.count(f"job {job_id} succeeded") == 1
    assert logs.count(f"job {job_id} is not queued") == 1


def test_broker_restart_without_persistence_loses_no_job(stack: Stack) -> None:
    # arrange: one worker busy with a job while two more wait in Redis
    client = _tenant_client(stack.base)
    dataset_id = _dataset(client)
    stack.worker()
    running = client.post("/v1/jobs", json=dp_job_spec(dataset_id, epsilon=2.0, epochs=100)).json()[
        "id"
    ]
    queued = [
        client.post("/v1/jobs", json=dp_job_spec(dataset_id, epsilon=1.0, epochs=3)).json()["id"]
        for _ in range(2)
    ]
    wait_for_status(client, running, {"running"}, timeout=120)
    # act: Redis dies with the queued messages and comes back empty
    stack.restart_redis()
    # assert: every job still ends, and each is charged exactly once
    for job_id in [running, *queued]:
        job = wait_for_status(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=180)
        assert job["status"] == "succeeded", job
        kinds = sorted(e["kind"] for e in _ledger(client, dataset_id, job_id))
        assert kinds == ["commit", "release", "reserve"]
