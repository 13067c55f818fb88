"""DP synthetic data (kind synthesize) through a real ``ppml serve`` (API and its worker):
admission and the charge on the ledger, the 409 once the budget is spent, the signed receipt,
and what owners and analysts may read.

One small job serves the module (two features of breast_cancer and the label, 4 bins): MST's
graphical model compiles in JAX, which takes tens of seconds on a loaded machine.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, new_key, new_tenant_id
from tests.integration.stack import embedded_serve, wait_for_status

BUDGET = {"epsilon": 3.0, "delta": 1e-5}


def _spec(dataset_id: str, epsilon: float, **synthesize: Any) -> dict[str, Any]:
    return {
        "name": "synthetic",
        "dataset_id": dataset_id,
        "kind": "synthesize",
        "privacy": {"target_epsilon": epsilon},
        "synthesize": {"features": [0, 1], "bins": 4, "rows": 150, **synthesize},
    }


@dataclass
class World:
    owner: httpx.Client
    analyst: httpx.Client
    dataset_id: str
    job: dict[str, Any]
    quote: dict[str, Any]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root: Path = tmp_path_factory.mktemp("synthetic")
    with embedded_serve(root, ADMIN_TOKEN) as (base, _proc):
        admin = httpx.Client(base_url=base, timeout=30)
        tenant_id = new_tenant_id(admin)
        clients = [
            httpx.Client(base_url=base, timeout=30, headers=new_key(admin, tenant_id, role))
            for role in ("owner", "analyst")
        ]
        owner, analyst = clients
        body = {"name": "bc", "source": {"builtin": "breast_cancer"}, "privacy_budget": BUDGET}
        registered = owner.post("/v1/datasets", json=body)
        assert registered.status_code == 201, registered.text
        dataset_id = registered.json()["id"]
        quote = analyst.post("/v1/jobs/quote", json=_spec(dataset_id, 2.0))
        assert quote.status_code == 200, quote.text
        submitted = analyst.post("/v1/jobs", json=_spec(dataset_id, 2.0))
        assert submitted.status_code == 202, submitted.text
        job = wait_for_status(analyst, submitted.json()["id"], {"succeeded", "failed"}, 400)
        yield World(owner, analyst, dataset_id, job, quote.json())
        for client in (*clients, admin):
            client.close()


def test_the_job_is_admitted_charged_once_and_succeeds(world: World) -> None:
    # arrange
    job = world.job
    # act
    budget = world.owner.get(f"/v1/datasets/{world.dataset_id}/budget").json()
    entries = world.owner.get(f"/v1/datasets/{world.dataset_id}/ledger").json()["items"]
    # assert
    assert job["status"] == "succeeded", job
    assert 1.99 <= world.quote["epsilon"] <= 2.0
    assert job["privacy"]["epsilon_spent"] == pytest.approx(world.quote["epsilon"])
    assert budget["epsilon_reserved"] == 0
    spent = job["privacy"]["epsilon_spent"]
    assert budget["epsilon_spent_composed"] == pytest.approx(spent, rel=1e-6)
    assert budget["epsilon_spent"] >= budget["epsilon_spent_composed"]  # the filter's unit
    kinds = sorted(e["kind"] for e in entries if e["job_id"] == job["id"])
    assert kinds == ["commit", "release", "reserve"]
    commit = next(e for e in entries if e["kind"] == "commit")
    assert commit["epsilon"] == pytest.approx(job["privacy"]["epsilon_spent"], rel=1e-6)


def test_a_job_the_budget_cannot_pay_is_a_409_that_writes_nothing(world: World) -> None:
    # arrange
    before = world.owner.get(f"/v1/datasets/{world.dataset_id}/ledger").json()["items"]
    # act
    refused = world.analyst.post("/v1/jobs", json=_spec(world.dataset_id, 2.0))
    # assert
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["type"].endswith("budget-exceeded")
    assert 0 < problem["epsilon_remaining"] < 2.0
    largest = problem["max_target_epsilon"]
    assert 0 < largest < 2.0
    fits = world.analyst.post("/v1/jobs/quote", json=_spec(world.dataset_id, largest * 0.999))
    assert fits.json()["fits_budget"] is True, fits.text
    after = world.owner.get(f"/v1/datasets/{world.dataset_id}/ledger").json()["items"]
    assert after == before


def test_analysts_get_the_rows_and_the_synthetic_only_report(world: World) -> None:
    # arrange
    job_id = world.job["id"]
    # act
    download = world.analyst.get(f"/v1/jobs/{job_id}/synthetic")
    analyst_report = world.analyst.get(f"/v1/jobs/{job_id}/synthetic/report")
    owner_report = world.owner.get(f"/v1/jobs/{job_id}/synthetic/report")
    # assert
    assert download.status_code == 200, download.text
    rows = list(csv.reader(io.StringIO(download.text)))
    assert rows[0] == ["mean radius", "mean texture", "label"]
    assert len(rows) == 151
    assert {row[2] for row in rows[1:]} <= {"malignant", "benign"}
    assert analyst_report.status_code == 200 and owner_report.status_code == 200
    assert set(analyst_report.json()) == {"job_id", "synthetic"}
    assert analyst_report.json()["synthetic"]["rows"] == 150
    assert 0 < analyst_report.json()["synthetic"]["coverage"]["mean"] <= 1
    private = owner_report.json()["private"]
    assert 0 <= private["tv_1way_mean"] <= private["tv_1way_max"] <= 1
    assert 0 <= private["tv_2way_mean"] <= 1
    assert private["trtr_accuracy"] is not None


def test_the_signed_receipt_binds_the_table_and_the_mst_charge(world: World) -> None:
    # arrange
    job_id = world.job["id"]
    digest = world.analyst.get(f"/v1/jobs/{job_id}/synthetic").headers["x-content-sha256"]
    # act
    receipt = world.analyst.get(f"/v1/jobs/{job_id}/receipt")
    # assert
    assert receipt.status_code == 200, receipt.text
    text = json.dumps(receipt.json())
    assert digest in text
    assert '"mechanism": "mst"' in text
    assert '"zcdp_rho"' in text


def test_wrong_requests_are_clear_4xx_problems(world: World) -> None:
    # arrange
    ds = world.dataset_id
    with_model = {**_spec(ds, 0.5), "model": {"arch": "mlp"}}
    # act
    answers = [
        world.analyst.post("/v1/jobs", json=with_model),
        world.analyst.post("/v1/jobs", json=_spec(ds, 0.5, features=[99])),
        world.analyst.post("/v1/jobs", json={**_spec(ds, 0.5), "privacy": None}),
        world.analyst.get(f"/v1/jobs/{world.job['id']}/model"),
    ]
    # assert
    assert [a.status_code for a in answers] == [422, 422, 422, 409], [a.text for a in answers]
    assert all(a.headers["content-type"] == "application/problem+json" for a in answers)
