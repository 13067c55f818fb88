"""Deleting a dataset erases its data and keeps its accounting; its rows stay bound to their
budget (the same file cannot be registered again with a new one), a modified copy is not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient

from ppml.client import PPMLClient
from ppml.config import Settings
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.jobs.checkpoints import JobCheckpoints
from ppml.jobs.runner import JobRunner
from ppml.storage import ArtifactStore
from tests.conftest import new_key, new_tenant_id, register_digits
from tests.integration.audit_helpers import tiny_spec, trail
from tests.integration.ingest_helpers import ingest_in, upload

SCHEMA = '{"classes": ["sick", "well"]}'


def _csv(change: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    rows = [
        f"{rng.integers(20, 90)},{rng.random():.4f},{'sick' if i % 3 else 'well'}"
        for i in range(300)
    ]
    if change:
        rows[17] = rows[17].replace(",0.", ",1.", 1)  # one value of one row
    return ("age,dose,label\n" + "\n".join(rows) + "\n").encode()


def _upload(client: TestClient, headers: dict[str, str], content: bytes, **fields: Any) -> Any:
    """A budgeted upload, ingested: the answer shows the dataset ready or invalid."""
    data = {"name": "p", "target": "label", "schema": SCHEMA, "epsilon": "4", "delta": "1e-5"}
    return upload(client, headers, data={**data, **fields}, files={"file": ("p.csv", content)})


def _files(data_dir: Path, folder: str, stem: str) -> list[str]:
    return sorted(p.name for p in (data_dir / folder).glob(f"{stem}*"))


def _problem(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = answer.json()
    assert body["type"] == f"/problems/{code}", body
    return body


def test_deletion_erases_data_and_checkpoints_keeps_the_accounting_and_optionally_models(
    client: TestClient, database: Database, settings: Settings
) -> None:
    # arrange: a trained job on budgeted digits, and a checkpoint a failed attempt left
    tenant_id = new_tenant_id(client)
    owner, analyst = new_key(client, tenant_id, "owner"), new_key(client, tenant_id, "analyst")
    dataset_id = register_digits(client, owner)
    job_id = client.post("/v1/jobs", json=tiny_spec(dataset_id), headers=owner).json()["id"]
    assert JobRunner(database, settings).run(job_id) == "succeeded"
    store = ArtifactStore.for_settings(settings)
    store.write(JobCheckpoints(store, job_id).key(1), lambda path: path.write_bytes(b"state"))
    data_dir = settings.data_dir
    assert _files(data_dir, "datasets", dataset_id) == [f"{dataset_id}.npz"]
    models = _files(data_dir, "models", job_id)
    budget_before = client.get(f"/v1/datasets/{dataset_id}/budget", headers=owner).json()
    # act
    by_analyst = client.delete(f"/v1/datasets/{dataset_id}", headers=analyst)
    deleted = client.delete(f"/v1/datasets/{dataset_id}", headers=owner)
    shown = client.get(f"/v1/datasets/{dataset_id}", headers=owner)
    listed = client.get("/v1/datasets", headers=owner).json()["items"]
    kept_model = client.get(f"/v1/jobs/{job_id}/model", headers=owner)
    submitted = client.post("/v1/jobs", json=tiny_spec(dataset_id), headers=owner)
    models_too = client.delete(
        f"/v1/datasets/{dataset_id}", params={"delete_models": "true"}, headers=owner
    )
    job = client.get(f"/v1/jobs/{job_id}", headers=analyst)
    gone = client.get(f"/v1/jobs/{job_id}/model", params={"format": "onnx"}, headers=owner)
    predicted = client.post(
        f"/v1/jobs/{job_id}/predict", json={"inputs": [[0.0] * 64]}, headers=owner
    )
    card = client.get(f"/v1/jobs/{job_id}/model/card", headers=owner)
    # assert: the data and the checkpoint went at once; the models only when asked
    _problem(by_analyst, 403, "forbidden")
    assert deleted.status_code == 204 and models_too.status_code == 204
    assert _files(data_dir, "datasets", dataset_id) == []
    assert _files(data_dir, "checkpoints", job_id) == []
    assert kept_model.status_code == 200 and models != []
    assert _files(data_dir, "models", job_id) == []
    assert _problem(shown, 404, "dataset-deleted")["deleted_at"]
    for path in ("/budget", "/ledger"):
        _problem(
            client.get(f"/v1/datasets/{dataset_id}{path}", headers=owner), 404, "dataset-deleted"
        )
    assert dataset_id not in [d["id"] for d in listed]
    _problem(submitted, 404, "dataset-deleted")
    assert job.status_code == 200 and job.json()["models_deleted_at"] is not None
    _problem(gone, 410, "model-deleted")
    _problem(predicted, 410, "model-deleted")
    assert card.status_code == 200 and card.json()["privacy"]["epsilon"] > 0
    # the budget row, the ledger and the audit trail are kept
    with database.session() as session:
        repos = Repositories(session)
        budget = repos.budget(dataset_id)
        entries = [e.kind for e in repos.ledger_entries(dataset_id)]
    assert budget is not None and budget.epsilon_total == budget_before["epsilon_total"]
    assert entries[0] == "reserve" and "commit" in entries
    deletions = trail(client, owner, action="dataset.delete")
    assert [(e["object_id"], e["actor_role"]) for e in deletions] == [(dataset_id, "owner")] * 2
    assert [e["detail"]["models_deleted"] for e in deletions] == [0, 1]


def test_a_dataset_with_queued_jobs_is_not_deleted(client: TestClient) -> None:
    # arrange: a queued job (no worker runs here)
    owner = new_key(client, new_tenant_id(client), "owner")
    dataset_id = register_digits(client, owner)
    job_id = client.post("/v1/jobs", json=tiny_spec(dataset_id), headers=owner).json()["id"]
    # act
    busy = client.delete(f"/v1/datasets/{dataset_id}", headers=owner)
    client.post(f"/v1/jobs/{job_id}/cancel", headers=owner)
    after_cancel = client.delete(f"/v1/datasets/{dataset_id}", headers=owner)
    quoted = client.post("/v1/jobs/quote", json=tiny_spec(dataset_id), headers=owner)
    # assert
    problem = _problem(busy, 409, "dataset-in-use")
    assert problem["active_jobs"] == [job_id] and "queued or running" in problem["detail"]
    assert after_cancel.status_code == 204
    _problem(quoted, 404, "dataset-deleted")


def test_a_validation_set_in_use_is_not_deleted(client: TestClient) -> None:
    # arrange: public digits scoring budgeted digits
    owner = new_key(client, new_tenant_id(client), "owner")
    public = register_digits(client, owner, epsilon=None)
    body = {
        "name": "digits",
        "source": {"builtin": "digits"},
        "privacy_budget": {"epsilon": 8.0, "delta": 1e-5},
        "validation_dataset_id": public,
    }
    private = client.post("/v1/datasets", json=body, headers=owner).json()["id"]
    # act
    refused = client.delete(f"/v1/datasets/{public}", headers=owner)
    key = owner["Authorization"].removeprefix("Bearer ")
    transport = client._transport  # the CLI's client, on the test's app
    with PPMLClient("http://testserver", api_key=key, transport=transport) as cli:
        cli.delete_dataset(private, delete_models=True)
    accepted = client.delete(f"/v1/datasets/{public}", headers=owner)
    # assert
    assert _problem(refused, 409, "dataset-in-use")["validation_for"] == [private]
    assert accepted.status_code == 204


def test_the_same_rows_cannot_get_a_new_budget_even_after_deletion(client: TestClient) -> None:
    # arrange: budgeted digits and a budgeted upload, each registered once
    owner = new_key(client, new_tenant_id(client), "owner")
    digits = register_digits(client, owner)
    first = _upload(client, owner, _csv())
    assert first.json()["status"] == "ready", first.text
    budget = {"epsilon": 8.0, "delta": 1e-5}
    again = {"name": "again", "source": {"builtin": "digits"}, "privacy_budget": budget}
    # act
    twice = client.post("/v1/datasets", json=again, headers=owner)
    for dataset_id in (digits, first.json()["id"]):
        assert client.delete(f"/v1/datasets/{dataset_id}", headers=owner).status_code == 204
    after_deletion = client.post("/v1/datasets", json=again, headers=owner)
    reupload = _upload(client, owner, _csv())
    public = client.post("/v1/datasets", json={**again, "privacy_budget": None}, headers=owner)
    # assert: refused, naming the dataset whose budget binds the rows
    assert _problem(twice, 409, "dataset-already-registered")["dataset_id"] == digits
    refusal = _problem(after_deletion, 409, "dataset-already-registered")
    assert refusal["dataset_id"] == digits and refusal["dataset_deleted"] is True
    assert reupload.json()["status"] == "invalid"
    problem = reupload.json()["problem"]
    assert problem["type"] == "/problems/dataset-already-registered"
    assert problem["dataset_id"] == first.json()["id"] and problem["dataset_deleted"] is True
    assert public.status_code == 201  # public data has no budget to refund


def test_a_modified_copy_is_not_caught(client: TestClient) -> None:
    # arrange: the fingerprint hashes exact rows; it is not a similarity measure
    owner = new_key(client, new_tenant_id(client), "owner")
    first = _upload(client, owner, _csv())
    # act
    header, *rows = _csv().decode().splitlines()
    shuffled = _upload(client, owner, "\n".join([header, *reversed(rows), ""]).encode())
    modified = _upload(client, owner, _csv(change=True))
    # assert: reordering the rows is caught; changing one value is not (docs/privacy.md)
    assert first.json()["status"] == "ready"
    assert shuffled.json()["problem"]["type"] == "/problems/dataset-already-registered"
    assert modified.json()["status"] == "ready", modified.text


def test_deleting_an_upload_being_validated_keeps_nothing(
    client: TestClient, settings: Settings
) -> None:
    # arrange: an accepted upload that no worker has validated yet
    owner = new_key(client, new_tenant_id(client), "owner")
    data = {"name": "p", "target": "label", "schema": SCHEMA, "epsilon": "4", "delta": "1e-5"}
    accepted = client.post(
        "/v1/datasets/upload", headers=owner, data=data, files={"file": ("p.csv", _csv())}
    )
    dataset_id = accepted.json()["id"]
    # act
    deleted = client.delete(f"/v1/datasets/{dataset_id}", headers=owner)
    outcome = ingest_in(client, dataset_id)  # the worker's task, arriving late
    # assert
    assert accepted.status_code == 202 and deleted.status_code == 204
    assert outcome == "invalid"
    kept = [p for p in settings.data_dir.rglob(f"{dataset_id}*") if p.is_file()]
    assert kept == []
