"""DP standardisation statistics end to end, on SQLite and PostgreSQL: the owner's release is
charged once as a dataset-level ledger entry, the first job draws the values, a second job
reuses them at no further cost, and the served model standardises its inputs as training
did; refusals (budget, role, bounds, repeats, missing statistics) write nothing."""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ppml.config import Settings
from ppml.datasets import load_builtin
from ppml.datasets import statistics as st
from ppml.datasets.statistics import DatasetStatistics, standardize
from ppml.db.models import JobStatus, LedgerKind
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.inference import load_model as load_onnx
from ppml.jobs.runner import JobRunner
from ppml.privacy.ledger import Ledger
from ppml.services.datasets import BudgetRequest, register_builtin
from ppml.services.statistics import ensure_released, release_statistics, statistics_of
from ppml.services.tenants import Principal
from ppml.specs import JobSpec
from ppml.training.export import load_model
from tests.conftest import new_key, new_tenant_id
from tests.unit.worlds import RunnerWorld, make_world, worker_settings


@pytest.fixture
def world(database: Database, settings: Settings) -> RunnerWorld:
    return make_world(database, worker_settings(settings))


def breast_cancer(world: RunnerWorld, epsilon: float = 8.0) -> str:
    with world.db.session(write=True) as session:
        dataset = register_builtin(
            Repositories(session),
            world.store,
            world.settings,
            tenant_id=world.tenant_id,
            name="bc",
            builtin="breast_cancer",
            budget=BudgetRequest(epsilon=epsilon, delta=1e-5),
        )
    return dataset.id


def standardising_job(world: RunnerWorld, dataset_id: str) -> str:
    spec = JobSpec.model_validate(
        {
            "name": "scaled",
            "dataset_id": dataset_id,
            "model": {"arch": "logreg"},
            "training": {"epochs": 1, "batch_size": 64, "learning_rate": 0.5},
            "privacy": {"target_epsilon": 1.0, "delta": 1e-5},
            "preprocessing": {"standardize": True},
        }
    )
    job, _ = world.service.submit(world.tenant_id, spec)
    return job.id


def dataset_entries(world: RunnerWorld, dataset_id: str) -> list[Any]:
    with world.db.session() as session:
        return [e for e in Repositories(session).ledger_entries(dataset_id) if e.job_id is None]


def stats_of(world: RunnerWorld, dataset_id: str) -> DatasetStatistics:
    with world.db.session() as session:
        found = statistics_of(Repositories(session).dataset_by_id(dataset_id))  # type: ignore[arg-type]
    assert found is not None
    return found


def test_statistics_are_charged_once_and_reused_by_later_jobs_and_models(
    world: RunnerWorld,
) -> None:
    # arrange: the owner releases the statistics (the charge happens now)
    dataset_id = breast_cancer(world)
    owner = Principal(tenant_id=world.tenant_id, role="owner")
    plan = release_statistics(
        world.db, tenant_id=world.tenant_id, dataset_id=dataset_id, epsilon=0.1, bounds=None,
        by=owner,
    )  # fmt: skip
    assert plan.status == "pending" and plan.bounds_source == "builtin"
    entries = dataset_entries(world, dataset_id)
    assert [e.kind for e in entries] == [LedgerKind.RESERVE, LedgerKind.COMMIT]
    assert entries[1].epsilon <= 0.1 + 1e-9 and entries[1].id == plan.ledger_entry_id
    # act: two jobs that standardise
    runner = JobRunner(world.db, world.settings, owner="worker-a")
    first = standardising_job(world, dataset_id)
    assert runner.run(first) == "succeeded"
    released = stats_of(world, dataset_id)
    second = standardising_job(world, dataset_id)
    assert runner.run(second) == "succeeded"
    # assert: drawn once, by the first job; still one dataset-level charge
    assert released.status == "ready" and released.mean is not None
    assert stats_of(world, dataset_id) == released
    assert len(dataset_entries(world, dataset_id)) == 2
    for job_id in (first, second):  # each job charged only its own training
        assert {e.kind for e in world.job_ledger(job_id)} <= {
            LedgerKind.RESERVE,
            LedgerKind.COMMIT,
            LedgerKind.RELEASE,
        }
    with world.db.session() as session:
        ledger = Ledger(Repositories(session))
        budget = Repositories(session).budget(dataset_id)
        assert budget is not None
        committed, _ = ledger.fold(dataset_id)
        assert committed == tuple(budget.committed["units"]) and ledger.verify_chains() == []
    # the served model (ONNX) and the downloaded weights take raw rows
    job = world.job(second)
    assert job.artifacts is not None and job.status == JobStatus.SUCCEEDED
    onnx_ref, weights_ref = job.artifacts.get("onnx"), job.artifacts.get("safetensors")
    assert onnx_ref is not None and weights_ref is not None
    served = load_onnx(world.store.path(onnx_ref.key), sha256=onnx_ref.sha256)
    raw = load_builtin("breast_cancer").x_test[:50]
    (served_logits,) = served.session.run(["logits"], {"input": raw})
    downloaded, _ = load_model(world.store.path(weights_ref.key))
    import torch

    plain = downloaded.net  # the trained network behind its standardisation
    with torch.no_grad():
        expected = plain(torch.from_numpy(standardize(raw, released))).numpy()
    assert np.allclose(served_logits, expected, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- the API


def _register(client: TestClient, headers: dict[str, str], epsilon: float) -> str:
    body = {
        "name": "bc",
        "source": {"builtin": "breast_cancer"},
        "privacy_budget": {"epsilon": epsilon, "delta": 1e-5},
    }
    response = client.post("/v1/datasets", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _ledger(client: TestClient, headers: dict[str, str], dataset_id: str) -> list[Any]:
    response = client.get(f"/v1/datasets/{dataset_id}/ledger", headers=headers)
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def test_the_api_releases_statistics_to_owners_and_refuses_what_it_cannot_pay(
    client: TestClient,
) -> None:
    # arrange
    tenant_id = new_tenant_id(client, f"t{secrets.token_hex(3)}")
    owner, analyst = new_key(client, tenant_id, "owner"), new_key(client, tenant_id, "analyst")
    dataset_id = _register(client, owner, 1.0)
    url = f"/v1/datasets/{dataset_id}/statistics"
    job = {
        "name": "j",
        "dataset_id": dataset_id,
        "model": {"arch": "logreg"},
        "training": {"epochs": 1, "batch_size": 64, "learning_rate": 0.5},
        "privacy": {"target_epsilon": 0.5, "delta": 1e-5},
        "preprocessing": {"standardize": True},
    }
    # act / assert: refusals change nothing
    assert client.post(url, json={"epsilon": 0.1}, headers=analyst).status_code == 403
    assert client.post("/v1/jobs", json=job, headers=owner).status_code == 409
    bad = [[0.0, 1.0]] * 29 + [[2.0, 1.0]]
    for bounds in ([[0.0, 1.0]] * 3, bad):
        refused = client.post(url, json={"epsilon": 0.1, "bounds": bounds}, headers=owner)
        assert refused.status_code == 422 and refused.json()["field"] == "bounds", refused.text
    too_much = client.post(url, json={"epsilon": 5.0}, headers=owner)
    assert too_much.status_code == 409, too_much.text
    assert too_much.json()["type"].endswith("budget-exceeded")
    assert client.get(url, headers=analyst).status_code == 404
    assert _ledger(client, owner, dataset_id) == []
    # a release within the budget, with declared bounds, is visible to analysts
    bounds = [[0.0, 9.0]] * 30
    made = client.post(url, json={"epsilon": 0.2, "bounds": bounds}, headers=owner)
    assert made.status_code == 201, made.text
    shown = client.get(url, headers=analyst).json()
    assert shown["status"] == "pending" and shown["bounds_source"] == "declared"
    assert shown["bounds"] == bounds
    entries = sorted(_ledger(client, owner, dataset_id), key=lambda e: e["seq"])
    assert [(e["job_id"], e["kind"]) for e in entries] == [(None, "reserve"), (None, "commit")]
    assert client.post(url, json={"epsilon": 0.2}, headers=owner).status_code == 409
    # a job may now standardise; the filter sees the statistics' charge
    admitted = client.post("/v1/jobs", json=job, headers=analyst)
    assert admitted.status_code == 202, admitted.text


def test_without_public_bounds_the_worker_estimates_them_under_dp_and_draws_only_once(
    world: RunnerWorld,
) -> None:
    # arrange: a pending release whose bounds are to be estimated (a quarter of its rho)
    dataset_id = breast_cancer(world)
    x = load_builtin("breast_cancer").x_train
    d = x.shape[1]
    pending = DatasetStatistics(
        status="pending", epsilon=0.5, rho=0.004, rho_bounds=0.001,
        noise_std=st.moments_sigma(d, 0.003), sensitivity=(2.0 * d) ** 0.5,
        bounds_source="dp", bounds=None,
    )  # fmt: skip
    with world.db.session(write=True) as session:
        row = Repositories(session).lock_dataset(dataset_id)
        assert row is not None
        row.statistics = pending.model_dump(mode="json")
    reads = []

    def rows() -> np.ndarray:
        reads.append(1)
        return x

    # act
    first = ensure_released(world.db, dataset_id, rows)
    again = ensure_released(world.db, dataset_id, rows)
    # assert: bounds found, one draw kept, the data read once
    assert first.status == "ready" and first.bounds is not None and len(first.bounds) == d
    assert all(low < high for low, high in first.bounds)
    assert again == first == stats_of(world, dataset_id) and reads == [1]
    scaled = standardize(x, first)
    assert np.isfinite(scaled).all()
