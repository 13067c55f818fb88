"""Federated jobs through the service: priced, admitted, run by the worker's runner, charged."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ppml.config import Settings
from ppml.db.session import Database
from ppml.jobs.records import PrivacyRecord
from ppml.jobs.runner import JobRunner
from ppml.privacy import accounting as acc
from ppml.privacy import calibration as cal
from tests.conftest import register_digits
from tests.integration import ingest_helpers

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


def _client_dataset(client: TestClient, tenant: dict[str, str]) -> tuple[str, int]:
    """An upload with 60 natural clients and a client-level budget; whole clients are held
    out, so the training side has about 48 of them. Returns its id and train clients."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.random((600, 5)), y=rng.integers(0, 2, 600), clients=np.arange(600) % 60)
    form = {
        "name": "c",
        "client_column": "clients",
        "epsilon": "4",
        "delta": "1e-3",
        "privacy_unit": "client",
        "schema": '{"classes": ["0", "1"]}',
    }
    upload = ingest_helpers.upload(
        client, tenant, data=form, files={"file": ("d.npz", buffer.getvalue())}
    )
    assert upload.status_code == 202 and upload.json()["status"] == "ready", upload.text
    assert upload.json()["num_clients"] + upload.json()["num_test_clients"] == 60
    return str(upload.json()["id"]), int(upload.json()["num_clients"])


@pytest.mark.parametrize("level", ["client", "sample"])
def test_federated_dp_job_runs_and_charges_its_mechanism(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings, level: str
) -> None:
    # arrange: DP-FedAvg over a client budget's natural clients, or DP-SGD per simulated
    # client on a record budget
    if level == "client":
        dataset_id, clients = _client_dataset(client, tenant)
        fed: dict[str, Any] = {"num_clients": clients, "partition": {"scheme": "column"}}
        spec = _spec(dataset_id, level, **fed, clients_per_round=clients // 2)
        delta = 1e-3
    else:
        dataset_id, delta = register_digits(client, tenant), 1e-5
        spec = _spec(dataset_id, level)
    submitted = client.post("/v1/jobs", json=spec, headers=tenant)
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["progress"]["round"] == 0  # queued: a federated job's counter
    plan = submitted.json()["privacy"]
    # act
    outcome = JobRunner(database, settings).run(submitted.json()["id"])
    job = client.get(f"/v1/jobs/{submitted.json()['id']}", headers=tenant).json()
    # assert: the planned mechanism is the one PRIVACY.md prescribes for the level
    dataset = client.get(f"/v1/datasets/{dataset_id}", headers=tenant).json()
    if level == "client":
        q = (clients // 2) / clients
        assert plan["unit"] == "client" and plan["sample_rate"] == q
        assert plan["steps_planned"] == 4
        scored_units = dataset["num_test_clients"]  # a held-out client is one unit
    else:
        shard = dataset["num_train"] / 10  # the keyed split's size (released metadata)
        q = 16 / shard
        assert plan["unit"] == "record" and plan["sample_rate"] == pytest.approx(q)
        assert plan["steps_planned"] == 4 * cal.steps_per_epoch(q)
        scored_units = dataset["num_test"]
    assert outcome == "succeeded" and job["status"] == "succeeded"
    assert job["progress"]["round"] == 4 and job["progress"]["fraction"] == 1.0
    # every round's score is a charged release, of the job's unit
    assert [h["round"] for h in job["metrics_history"]] == [1, 2, 3, 4]
    assert plan["evaluation"]["releases"] == 4 and plan["evaluation"]["scalar_releases"] == 8
    for entry in job["metrics_history"]:
        assert entry["release"]["mechanism"] == "gaussian"
        assert entry["release"]["units"] == scored_units
    assert job["metrics"] == job["metrics_history"][-1]  # the last score, not a fifth release
    event = PrivacyRecord.model_validate(plan).event(plan["steps_planned"])
    assert event.eval_releases == 8
    assert job["privacy"]["epsilon_spent"] == pytest.approx(
        acc.epsilon(acc.rdp_curve(event), delta)
    )
    assert job["privacy"]["epsilon_spent"] <= 2.0
    ledger = client.get(f"/v1/datasets/{dataset_id}/ledger", headers=tenant).json()["items"]
    assert sorted(e["kind"] for e in ledger) == ["commit", "release", "reserve"]
    assert client.get(f"/v1/jobs/{job['id']}/model", headers=tenant).status_code == 200


def test_client_level_budgets_refuse_record_level_jobs(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange
    dataset_id, clients = _client_dataset(client, tenant)
    column = {"num_clients": clients, "partition": {"scheme": "column"}, "clients_per_round": 6}
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
        json=_spec(dataset_id, "client", **{**column, "num_clients": clients - 1}),
        headers=tenant,
    )
    # assert
    assert record_level.status_code == 422 and record_level.json()["field"] == "privacy.level"
    assert centralised.status_code == 422 and centralised.json()["field"] == "privacy.level"
    assert client_level.status_code == 202, client_level.text
    assert client_level.json()["privacy"]["unit"] == "client"
    assert wrong_count.status_code == 422 and wrong_count.json()["field"] == "federated.num_clients"


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_client_level_over_simulated_clients_is_refused_and_reserves_nothing(
    client: TestClient, tenant: dict[str, str], scheme: str
) -> None:
    # arrange: the audit's reproduction, one patient's rows spread over many "clients"
    dataset_id, _clients = _client_dataset(client, tenant)
    spec = _spec(
        dataset_id,
        "client",
        # many simulated clients (the ~48 natural ones spread out), but never more than the
        # training rows the keyed split leaves (about 480 of 600, at least ~350)
        num_clients=200,
        clients_per_round=50,
        rounds=5,
        partition={"scheme": scheme},
    )
    spec["privacy"]["target_epsilon"] = 1.3
    # act
    refused = client.post("/v1/jobs", json=spec, headers=tenant)
    quoted = client.post("/v1/jobs/quote", json=spec, headers=tenant)
    # assert
    for response in (refused, quoted):
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["field"] == "federated.partition.scheme"
    ledger = client.get(f"/v1/datasets/{dataset_id}/ledger", headers=tenant).json()["items"]
    assert ledger == []
    assert client.get("/v1/jobs", headers=tenant).json()["items"] == []


def test_client_level_on_a_record_budget_is_refused(
    client: TestClient, tenant: dict[str, str]
) -> None:
    dataset_id = register_digits(client, tenant)
    refused = client.post("/v1/jobs", json=_spec(dataset_id, "client"), headers=tenant)
    assert refused.status_code == 422 and refused.json()["field"] == "privacy.level"
    assert client.get(f"/v1/datasets/{dataset_id}/ledger", headers=tenant).json()["items"] == []


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


def test_a_federated_job_scores_exactly_the_rounds_it_was_charged_for(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings
) -> None:
    # arrange: 5 rounds scored every 2nd round and after the last: 3 releases priced
    dataset_id = register_digits(client, tenant)
    spec = _spec(dataset_id, "sample", rounds=5, evaluate_every=2)
    submitted = client.post("/v1/jobs", json=spec, headers=tenant)
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["privacy"]["evaluation"]["releases"] == 3
    # act
    assert JobRunner(database, settings).run(submitted.json()["id"]) == "succeeded"
    job = client.get(f"/v1/jobs/{submitted.json()['id']}", headers=tenant).json()
    # assert: the worker released no more scores than admission charged
    assert [entry["round"] for entry in job["metrics_history"]] == [2, 4, 5]
