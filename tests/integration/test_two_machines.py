"""Workers on other machines: an API and two workers, each with its own data dir, sharing only
PostgreSQL, Redis and an S3 store (SeaweedFS). No file is shared between them.

A worker killed with SIGKILL mid-job is resumed by the other from the checkpoint it left in
the object store, the job is charged once, and the API serves the model (download, ranges,
predictions) and a receipt the worker signed with the keyring kept in the store.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

import httpx
import pytest

from ppml.trust.receipts import check_receipt
from tests.conftest import REDIS_URL, dp_job_spec
from tests.integration.s3_helpers import S3Server
from tests.integration.stack import (
    BIN,
    free_port,
    process,
    service_env,
    stop,
    tenant_client,
    wait_for_status,
    wait_ready,
)

ADMIN = "machines-admin-token-0123456789"
LEASE_S, REAPER_S = 10, 1  # a loaded machine may take seconds to its first report


@dataclass
class Machines:
    base: str
    tmp: Path
    env: dict[str, str]
    bucket: str
    exits: ExitStack
    workers: list[Popen[bytes]] = field(default_factory=list)

    def machine(self, name: str) -> dict[str, str]:
        """The environment of a process on its own machine: its own, empty data dir."""
        return service_env(self.tmp / name / "data", **self.env)

    def worker(self) -> None:
        name = f"worker{len(self.workers)}"
        log = self.tmp / f"{name}.log"
        command = [str(BIN / "ppml"), "worker"]
        self.workers.append(self.exits.enter_context(process(command, self.machine(name), log)))

    def log(self, index: int) -> str:
        path = self.tmp / f"worker{index}.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def machines(tmp_path: Path, pg_database_url: str, s3: S3Server) -> Iterator[Machines]:
    bucket = s3.new_bucket()
    env = {
        **s3.env(bucket),
        "PPML_ADMIN_TOKEN": ADMIN,
        # Shared by every process, as production requires: it seals what the store holds.
        "PPML_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
        "PPML_DATABASE_URL": pg_database_url,
        "PPML_BROKER_URL": REDIS_URL,
        "PPML_WORKER__QUEUE": f"training-{secrets.token_hex(4)}",
        "PPML_WORKER__LEASE_SECONDS": str(LEASE_S),
        "PPML_WORKER__REAPER_INTERVAL_S": str(REAPER_S),
        "PPML_WORKER__REPORT_EVERY_STEPS": "10",
        "PPML_WORKER__TORCH_THREADS": "1",
    }
    with ExitStack() as exits:
        port = free_port()
        stack = Machines(f"http://127.0.0.1:{port}", tmp_path, env, bucket, exits)
        api_log = tmp_path / "api.log"
        command = [str(BIN / "ppml"), "serve", "--no-worker", "--port", str(port)]
        api = exits.enter_context(process(command, stack.machine("api"), api_log))
        for _ in range(2):  # start while the API starts: each takes seconds to import torch
            stack.worker()
        wait_ready(stack.base, api, api_log)
        yield stack


def _wait_for(condition: str, check: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not callable(check) or not check():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.1)


def _claimed_by(machines: Machines, job_id: str, attempt: int) -> int:
    needle = f"job {job_id} claimed (attempt {attempt})"
    found: list[int] = []

    def claimed() -> bool:
        found.extend(i for i in range(len(machines.workers)) if needle in machines.log(i))
        return bool(found)

    _wait_for(needle, claimed)
    return found[0]


def test_workers_with_separate_data_dirs_resume_each_other_through_the_object_store(
    machines: Machines, s3: S3Server
) -> None:
    # arrange: two workers on "other machines"; a job long enough to be killed mid-way
    client = tenant_client(machines.base, ADMIN)
    budget = {"epsilon": 50.0, "delta": 1e-5}
    body = {"name": "d", "source": {"builtin": "digits"}, "privacy_budget": budget}
    dataset_id = client.post("/v1/datasets", json=body).json()["id"]
    rows = "".join(f"{i % 7},{i % 5},{i % 3},{i % 2}\n" for i in range(200))
    upload = client.post(
        "/v1/datasets/upload",
        data={"name": "u", "target": "label"},
        files={"file": ("u.csv", f"a,b,c,label\n{rows}".encode())},
    )
    assert upload.status_code == 202, upload.text
    for index in range(2):
        _wait_for("a worker", lambda index=index: " ready." in machines.log(index))
    spec = dp_job_spec(dataset_id, epsilon=10.0, epochs=30)  # ~350 steps
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    first = _claimed_by(machines, job_id, attempt=1)

    def progressed() -> bool:
        return int(client.get(f"/v1/jobs/{job_id}").json()["progress"]["steps"]) >= 40

    _wait_for("progress", progressed)
    reported = client.get(f"/v1/jobs/{job_id}").json()["progress"]["steps"]

    # act: kill -9 the worker running it
    stop(machines.workers[first], signal.SIGKILL)
    second = _claimed_by(machines, job_id, attempt=2)
    job = wait_for_status(client, job_id, {"failed", "succeeded", "cancelled"}, timeout=300)

    # assert: the other worker resumed from the object store's checkpoint, and finished
    resumed = re.search(
        rf"job {job_id} claimed \(attempt 2\), starting at step (\d+)", machines.log(second)
    )
    assert second != first and resumed is not None
    assert int(resumed[1]) >= reported > 0
    assert job["status"] == "succeeded", job
    entries = client.get(f"/v1/datasets/{dataset_id}/ledger", params={"page_size": 200}).json()
    kinds = sorted(e["kind"] for e in entries["items"] if e["job_id"] == job_id)
    assert kinds == ["commit", "release", "reserve"]  # charged once

    # assert: the API serves the model from the store, whole and by ranges
    model = client.get(f"/v1/jobs/{job_id}/model")
    assert model.status_code == 200
    digest = hashlib.sha256(model.content).hexdigest()
    card = client.get(f"/v1/jobs/{job_id}/model/card").json()
    assert digest == model.headers["x-content-sha256"] == card["artifacts"]["safetensors"]["sha256"]
    part = client.get(f"/v1/jobs/{job_id}/model", headers={"Range": "bytes=8-23"})
    assert part.status_code == 206 and part.content == model.content[8:24]
    assert part.headers["content-range"] == f"bytes 8-23/{len(model.content)}"
    far = client.get(f"/v1/jobs/{job_id}/model", headers={"Range": "bytes=999999999-"})
    assert far.status_code == 416
    assert far.headers["content-type"].startswith("application/problem+json")
    predicted = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [[0.0] * 64] * 3})
    assert predicted.status_code == 200, predicted.text
    assert len(predicted.json()["predictions"]) == 3

    # assert: the receipt a worker signed verifies with the keys the API serves
    receipt = client.get(f"/v1/jobs/{job_id}/receipt").content
    keys = httpx.get(f"{machines.base}/.well-known/ppml-signing-keys.json").content
    saved = machines.tmp / "model.safetensors"
    saved.write_bytes(model.content)
    assert check_receipt(saved, receipt, keys).ok

    # assert: a worker validated the upload the API stored (sealed) in the bucket
    uploaded = client.get(f"/v1/datasets/{upload.json()['id']}").json()
    assert uploaded["status"] == "ready", uploaded

    # assert: nothing protected or trained was written to any machine's own disk
    for name in ("api", "worker0", "worker1"):
        data = machines.tmp / name / "data"
        for kind in ("datasets", "models", "checkpoints", "keys"):
            assert not (data / kind).exists(), f"{name} wrote {kind} locally"
    objects = s3.client().list_objects_v2(Bucket=machines.bucket, Prefix="ppml/")
    stored = {item["Key"] for item in objects.get("Contents", [])}
    assert f"ppml/models/{job_id}.attempt-2.safetensors" in stored
    assert f"ppml/datasets/{dataset_id}.npz" in stored
    assert not any(key.startswith(f"ppml/checkpoints/{job_id}.") for key in stored)
