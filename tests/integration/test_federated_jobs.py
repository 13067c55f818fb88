"""Federated jobs through the service: priced, admitted, run by the worker's runner, charged."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ppml.config import Settings
from ppml.db.session import Database
from ppml.privacy import accounting as acc
from ppml.runner import JobRunner
from tests.conftest import register_digits

FED = {
    "num_clients": 10,
    "clients_per_round": 5,
    "rounds": 4,
    "local_epochs": 1,
    "partition": {"scheme": "dirichlet", "alpha": 0.5},
    "strategy": "fedavg",
}


def _spec(dataset_id: str, level: str | None, **fed: Any) -> dict[str, Any]:
    privacy = None if level is None else {"target_epsilon": 2.0, "level": level}
    return {
        "name": "fed",
        "dataset_id": dataset_id,
        "model": {"arch": "mlp", "hidden_sizes": [32]},
        "training": {"epochs": 1, "batch_size": 16, "learning_rate": 0.2},
        "privacy": privacy,
        "federated": {**FED, **fed},
    }


@pytest.mark.parametrize("level", ["client", "sample"])
def test_federated_dp_job_runs_and_charges_its_mechanism(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings, level: str
) -> None:
    # arrange
    dataset_id = register_digits(client, tenant)
    submitted = client.post("/v1/jobs", json=_spec(dataset_id, level), headers=tenant)
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["progress"]["round"] == 0  # queued: a federated job's counter
    plan = submitted.json()["privacy"]
    # act
    outcome = JobRunner(database, settings).run(submitted.json()["id"])
    job = client.get(f"/v1/jobs/{submitted.json()['id']}", headers=tenant).json()
    # assert: the planned mechanism is the one PRIVACY.md prescribes for the level
    if level == "client":
        assert (
            plan["unit"] == "client" and plan["sample_rate"] == 0.5 and plan["steps_planned"] == 4
        )
    else:
        shard = 1437 / 10
        q = 16 / shard
        assert plan["unit"] == "record" and plan["sample_rate"] == pytest.approx(q)
        assert plan["steps_planned"] == 4 * acc.steps_per_epoch(q)
    assert outcome == "succeeded" and job["status"] == "succeeded"
    assert job["progress"]["round"] == 4 and job["progress"]["fraction"] == 1.0
    assert [h["round"] for h in job["metrics_history"]] == [1, 2, 3, 4]
    event = acc.MechanismEvent(
        sample_rate=plan["sample_rate"],
        noise_multiplier=plan["noise_multiplier"],
        steps=plan["steps_planned"],
        unit=plan["unit"],
    )
    assert job["privacy"]["epsilon_spent"] == pytest.approx(acc.epsilon(acc.rdp_curve(event), 1e-5))
    assert job["privacy"]["epsilon_spent"] <= 2.0
    ledger = client.get(f"/v1/datasets/{dataset_id}/ledger", headers=tenant).json()["items"]
    assert sorted(e["kind"] for e in ledger) == ["commit", "release", "reserve"]
    assert client.get(f"/v1/jobs/{job['id']}/model", headers=tenant).status_code == 200


def test_client_level_budgets_refuse_record_level_jobs(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange: an upload with 12 natural clients and a client-level budget
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.random((600, 5)), y=rng.integers(0, 2, 600), clients=np.arange(600) % 12)
    form = {
        "name": "c",
        "client_column": "clients",
        "epsilon": "4",
        "delta": "1e-3",
        "privacy_unit": "client",
    }
    upload = client.post(
        "/v1/datasets/upload",
        headers=tenant,
        data=form,
        files={"file": ("d.npz", buffer.getvalue())},
    )
    assert upload.status_code == 201, upload.text
    dataset_id = upload.json()["id"]
    column = {"num_clients": 12, "partition": {"scheme": "column"}, "clients_per_round": 6}
    # act
    record_level = client.post(
        "/v1/jobs", json=_spec(dataset_id, "sample", **column), headers=tenant
    )
    centralised = client.post(
        "/v1/jobs", json={**_spec(dataset_id, "sample"), "federated": None}, headers=tenant
    )
    client_level = client.post(
        "/v1/jobs", json=_spec(dataset_id, "client", **column), headers=tenant
    )
    wrong_count = client.post(
        "/v1/jobs",
        json=_spec(dataset_id, "client", **{**column, "num_clients": 11, "clients_per_round": 5}),
        headers=tenant,
    )
    # assert
    assert record_level.status_code == 422 and record_level.json()["field"] == "privacy.level"
    assert centralised.status_code == 422 and centralised.json()["field"] == "privacy.level"
    assert client_level.status_code == 202, client_level.text
    assert client_level.json()["privacy"]["unit"] == "client"
    assert wrong_count.status_code == 422 and wrong_count.json()["field"] == "federated.num_clients"


def test_non_private_federated_job_on_public_data(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings
) -> None:
    dataset_id = register_digits(client, tenant, epsilon=None)
    job = client.post(
        "/v1/jobs",
        json=_spec(dataset_id, None, strategy="fedadam", server_learning_rate=0.05),
        headers=tenant,
    ).json()
    assert JobRunner(database, settings).run(job["id"]) == "succeeded"
    done = client.get(f"/v1/jobs/{job['id']}", headers=tenant).json()
    assert done["metrics"]["test_accuracy"] > 0.3 and done["privacy"] is None
