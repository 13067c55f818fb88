"""The whole service, as real processes, on both deployments.

* embedded: ``ppml serve`` alone (SQLite, kombu's filesystem broker, its own worker process);
* production: PostgreSQL + Redis + ``ppml serve --no-worker`` + a separate ``ppml worker``.

Both run the same scenario over HTTP: register digits (ε = 8), train a DP model (ε = 3), download
it, load it into its architecture and predict; the budget shows the charge; an over-budget job
and a non-private job are refused with 409.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ppml.datasets import load_arrays
from tests.conftest import REDIS_URL, dp_job_spec
from tests.integration.stack import (
    BIN,
    embedded_serve,
    free_port,
    process,
    service_env,
    tenant_client,
    wait_for_status,
    wait_ready,
)

ADMIN = "stack-admin-token-0123456789"


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[str]:
    with embedded_serve(tmp_path, ADMIN) as (base, _proc):
        yield base


@pytest.fixture
def production(tmp_path: Path, pg_database_url: str) -> Iterator[str]:
    port = free_port()
    env = service_env(
        tmp_path / "data",
        PPML_ADMIN_TOKEN=ADMIN,
        PPML_DATABASE_URL=pg_database_url,
        PPML_BROKER_URL=REDIS_URL,
        PPML_WORKER__QUEUE=f"training-{secrets.token_hex(4)}",
    )
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    api_args = [str(BIN / "ppml"), "serve", "--no-worker", "--port", str(port)]
    with process(api_args, env, api_log) as api:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api, api_log)
        with process([str(BIN / "ppml"), "worker"], env, worker_log):
            yield base


def _predict_accuracy(
    model_bytes: bytes, tmp_path: Path, dataset_id: str
) -> tuple[float, dict[str, str]]:
    import torch

    from ppml.training.export import load_model

    path = tmp_path / "model.safetensors"
    path.write_bytes(model_bytes)
    module, metadata = load_model(path)
    # The split is keyed by the dataset's secret: read the stored test rows, as the owner may.
    arrays = load_arrays(tmp_path / "data" / "datasets" / f"{dataset_id}.npz")
    with torch.no_grad():
        logits = module(torch.from_numpy(arrays.x_test))
    accuracy = float((logits.argmax(1).numpy() == arrays.y_test).mean())
    return accuracy, metadata


def _scenario(base: str, tmp_path: Path) -> dict[str, Any]:
    client = tenant_client(base, ADMIN)
    body = {"name": "digits", "source": {"builtin": "digits"}}
    created = client.post(
        "/v1/datasets", json={**body, "privacy_budget": {"epsilon": 8.0, "delta": 1e-5}}
    )
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]

    submitted = client.post("/v1/jobs", json=dp_job_spec(dataset_id, epsilon=3.0))
    assert submitted.status_code == 202, submitted.text
    assert submitted.headers["location"] == f"/v1/jobs/{submitted.json()['id']}"
    job = wait_for_status(client, submitted.json()["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    exact = client.get(f"/v1/jobs/{job['id']}/metrics/exact").json()["metrics"]  # an owner key
    assert exact["test_accuracy"] >= 0.80
    release = job["metrics"]["release"]
    assert release["mechanism"] == "gaussian"
    noise = abs(job["metrics"]["test_accuracy"] - exact["test_accuracy"])
    assert noise <= 6 * release["accuracy_noise_std"]
    assert 2.9 < job["privacy"]["epsilon_spent"] <= 3.0
    assert job["progress"]["fraction"] == 1.0

    download = client.get(f"/v1/jobs/{job['id']}/model")
    assert download.status_code == 200
    accuracy, receipt = _predict_accuracy(download.content, tmp_path, dataset_id)
    assert accuracy == pytest.approx(exact["test_accuracy"], abs=1e-9)
    assert receipt["job_id"] == job["id"] and receipt["dataset_id"] == dataset_id
    assert float(receipt["epsilon"]) == job["privacy"]["epsilon_spent"]

    budget = client.get(f"/v1/datasets/{dataset_id}/budget").json()
    assert budget["epsilon_spent"] == pytest.approx(job["privacy"]["epsilon_spent"])
    assert budget["epsilon_reserved"] == 0
    assert 0 < budget["epsilon_remaining"] < 8.0 - 3.0 + 1.5  # RDP composes below the sum

    over = client.post("/v1/jobs", json=dp_job_spec(dataset_id, epsilon=7.9))
    assert over.status_code == 409 and over.json()["type"].endswith("budget-exceeded")
    public = client.post("/v1/jobs", json={**dp_job_spec(dataset_id), "privacy": None})
    assert public.status_code == 409
    return {"accuracy": accuracy, "job": job}


def test_embedded_stack_trains_and_serves_a_dp_model(embedded: str, tmp_path: Path) -> None:
    result = _scenario(embedded, tmp_path)
    assert result["accuracy"] >= 0.80


def test_production_stack_trains_and_serves_a_dp_model(production: str, tmp_path: Path) -> None:
    result = _scenario(production, tmp_path)
    assert result["accuracy"] >= 0.80


def test_running_job_cancels_and_is_charged_for_steps_run(production: str) -> None:
    # arrange: a long job (1000 epochs) on a generous budget
    client = tenant_client(production, ADMIN)
    body = {
        "name": "d",
        "source": {"builtin": "digits"},
        "privacy_budget": {"epsilon": 50.0, "delta": 1e-5},
    }
    dataset_id = client.post("/v1/datasets", json=body).json()["id"]
    spec = dp_job_spec(dataset_id, epsilon=10.0, epochs=1000)
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    wait_for_status(client, job_id, {"running"})
    # act
    cancel = client.post(f"/v1/jobs/{job_id}/cancel")
    job = wait_for_status(client, job_id, {"cancelled", "succeeded", "failed"}, timeout=60)
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    # assert
    assert cancel.status_code == 202
    assert job["status"] == "cancelled"
    assert again.status_code == 409
    steps = job["privacy"]["steps"]
    assert 0 < steps < job["privacy"]["steps_planned"]
    kinds = [e["kind"] for e in client.get(f"/v1/datasets/{dataset_id}/ledger").json()["items"]]
    assert sorted(kinds) == ["commit", "release", "reserve"]
    budget = client.get(f"/v1/datasets/{dataset_id}/budget").json()
    assert budget["epsilon_reserved"] == 0
    assert 0 < budget["epsilon_spent"] < 10.0
    assert np.isclose(budget["epsilon_spent"], job["privacy"]["epsilon_spent"])
