"""Private prediction (kind pate) through a real ``ppml serve`` (API and its worker):
admission, the charge of every batch of answers on the ledger, the 409 once the answers
have spent the budget, the receipt that lists them, what owners and analysts may do, the
refusal on client-unit data, and what an answer may carry (labels, never votes).

One small job serves the module: three logistic-regression teachers on breast_cancer.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ppml.privacy import accounting as acc
from ppml.trust.receipts import check_receipt
from tests.conftest import ADMIN_TOKEN, new_key, new_tenant_id
from tests.integration.stack import embedded_serve, wait_for_status

BUDGET = {"epsilon": 3.0, "delta": 1e-5}
QUERY_EPSILON = 0.5
ANSWER_FIELDS = {
    "predictions",
    "class_indices",
    "queries",
    "queries_total",
    "epsilon_charged",
    "epsilon_remaining",
    "noise_multiplier",
    "ledger_entry_id",
}


def _spec(dataset_id: str, **pate: Any) -> dict[str, Any]:
    return {
        "name": "pate",
        "dataset_id": dataset_id,
        "kind": "pate",
        "model": {"arch": "logreg"},
        "training": {"epochs": 2, "batch_size": 32, "learning_rate": 0.1},
        "privacy": None,
        "pate": {"teachers": 3, "query_epsilon": QUERY_EPSILON, **pate},
    }


@dataclass
class World:
    owner: httpx.Client
    analyst: httpx.Client
    dataset_id: str
    job: dict[str, Any]
    rows: list[list[float]]


def _rows(n: int) -> list[list[float]]:
    from sklearn.datasets import load_breast_cancer

    x = load_breast_cancer().data[:n]
    return [[float(v) for v in row] for row in x]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root: Path = tmp_path_factory.mktemp("pate")
    with embedded_serve(root, ADMIN_TOKEN) as (base, _proc):
        admin = httpx.Client(base_url=base, timeout=60)
        tenant_id = new_tenant_id(admin)
        clients = [
            httpx.Client(base_url=base, timeout=60, headers=new_key(admin, tenant_id, role))
            for role in ("owner", "analyst")
        ]
        owner, analyst = clients
        body = {"name": "bc", "source": {"builtin": "breast_cancer"}, "privacy_budget": BUDGET}
        registered = owner.post("/v1/datasets", json=body)
        assert registered.status_code == 201, registered.text
        dataset_id = registered.json()["id"]
        submitted = analyst.post("/v1/jobs", json=_spec(dataset_id))
        assert submitted.status_code == 202, submitted.text
        job = wait_for_status(analyst, submitted.json()["id"], {"succeeded", "failed"}, 300)
        yield World(owner, analyst, dataset_id, job, _rows(40))
        for client in (*clients, admin):
            client.close()


def _ledger(world: World) -> list[dict[str, Any]]:
    page = world.owner.get(f"/v1/datasets/{world.dataset_id}/ledger", params={"page_size": 200})
    assert page.status_code == 200, page.text
    # In chain order: ids made in the same millisecond do not sort by time.
    items: list[dict[str, Any]] = sorted(page.json()["items"], key=lambda e: e["seq"])
    return items


def _predict(client: httpx.Client, job_id: str, rows: list[list[float]]) -> httpx.Response:
    return client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": rows})


def test_the_job_is_admitted_for_nothing_and_its_teachers_stay_private(world: World) -> None:
    # arrange
    job_id = world.job["id"]
    # act
    entries = [e for e in _ledger(world) if e["job_id"] == job_id]
    downloads = [
        client.get(f"/v1/jobs/{job_id}/model", params={"format": fmt})
        for client in (world.owner, world.analyst)
        for fmt in ("safetensors", "onnx")
    ]
    card = world.analyst.get(f"/v1/jobs/{job_id}/model/card")
    quote = world.analyst.post("/v1/jobs/quote", json=_spec(world.dataset_id))
    # assert: a zero reservation released at the end; no route serves the teachers
    assert world.job["status"] == "succeeded", world.job
    assert sorted(e["kind"] for e in entries) == ["release", "reserve"]
    assert all(e["epsilon"] == 0 for e in entries)
    assert [d.status_code for d in downloads] == [409] * 4
    assert all("private" in d.json()["detail"] for d in downloads)
    assert card.status_code == 409
    assert world.job["privacy"]["mechanism"] == "gnmax"
    assert world.job["privacy"]["queries"] == 0
    assert quote.status_code == 200, quote.text
    assert quote.json()["epsilon"] == 0 and quote.json()["fits_budget"] is True
    assert quote.json()["noise_multiplier"] == world.job["privacy"]["noise_multiplier"]


def test_answers_are_labels_only_and_each_batch_is_charged_once(world: World) -> None:
    # arrange
    job_id = world.job["id"]
    before = _ledger(world)
    # act
    answer = _predict(world.analyst, job_id, world.rows[:5])
    after = _ledger(world)
    # assert
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == ANSWER_FIELDS  # no votes, vote shares or probabilities
    assert body["queries"] == 5 and body["queries_total"] == 5
    assert set(body["predictions"]) <= {"malignant", "benign"}
    assert len(body["predictions"]) == 5
    new = after[len(before) :]
    assert [e["kind"] for e in new] == ["reserve", "commit"]
    assert {e["job_id"] for e in new} == {job_id}
    assert new[1]["id"] == body["ledger_entry_id"]
    assert new[1]["epsilon"] == pytest.approx(body["epsilon_charged"])


def test_a_batch_costs_at_least_the_reference_gnmax_bound(world: World) -> None:
    # arrange: the reference is dp-accounting's Gaussian mechanism of L2 sensitivity √2
    # (one teacher's vote moves: −1 on a class, +1 on another), composed n times
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    n = 4
    # act
    answer = _predict(world.analyst, world.job["id"], world.rows[:n]).json()
    sigma = answer["noise_multiplier"]
    reference = RdpAccountant(orders=list(acc.ORDERS))
    reference.compose(SelfComposedDpEvent(GaussianDpEvent(sigma / math.sqrt(2)), n))
    # assert
    assert answer["epsilon_charged"] >= reference.get_epsilon(BUDGET["delta"])
    one = RdpAccountant(orders=list(acc.ORDERS))
    one.compose(GaussianDpEvent(sigma / math.sqrt(2)))
    assert one.get_epsilon(BUDGET["delta"]) <= QUERY_EPSILON


def test_the_receipt_lists_the_answers_charged_so_far(world: World) -> None:
    # arrange
    job_id = world.job["id"]
    by_owner = _predict(world.owner, job_id, world.rows[:2])
    assert by_owner.status_code == 200 and set(by_owner.json()) == ANSWER_FIELDS
    total = world.analyst.get(f"/v1/jobs/{job_id}").json()["privacy"]["queries"]
    # act
    receipt = world.analyst.get(f"/v1/jobs/{job_id}/receipt")
    # assert
    assert receipt.status_code == 200, receipt.text
    payload = receipt.json()["receipt"]
    (mechanism,) = payload["privacy"]["mechanisms"]
    assert mechanism["mechanism"] == "gnmax" and mechanism["queries"] == total
    charged = [e for e in _ledger(world) if e["job_id"] == job_id and e["kind"] == "commit"]
    bound = {e["id"] for e in payload["ledger"]["entries"] if e["kind"] == "commit"}
    assert bound == {e["id"] for e in charged}
    assert payload["ledger"]["chain_head"]["entry_id"] == _ledger(world)[-1]["id"]
    assert payload["artifacts"] == {}  # the teachers' digest is not released either


def _upload(owner: httpx.Client, form: dict[str, str], arrays: dict[str, Any]) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    upload = owner.post(
        "/v1/datasets/upload", data=form, files={"file": ("d.npz", buffer.getvalue())}
    )
    assert upload.status_code == 202, upload.text
    dataset_id = str(upload.json()["id"])
    for _ in range(300):
        shown = owner.get(f"/v1/datasets/{dataset_id}").json()
        if shown["status"] != "validating":
            break
        time.sleep(0.2)
    assert shown["status"] == "ready", shown
    return dataset_id


def test_a_student_is_released_as_a_model_whose_cost_is_its_answers(
    world: World, tmp_path: Path
) -> None:
    # arrange: 60 public rows of breast_cancer's width, registered without a budget
    rng = np.random.default_rng(5)
    x = np.asarray(world.rows + world.rows[:20]) * rng.uniform(0.9, 1.1, (60, 30))
    form = {"name": "public", "schema": '{"classes": ["0", "1"]}'}
    public = _upload(world.analyst, form, {"x": x, "y": rng.integers(0, 2, 60)})
    spec = _spec(world.dataset_id, query_epsilon=None, sigma=40.0)
    spec["pate"]["student"] = {"public_dataset_id": public, "queries": 20}
    quote = world.analyst.post("/v1/jobs/quote", json=spec).json()
    # act
    submitted = world.analyst.post("/v1/jobs", json=spec)
    assert submitted.status_code == 202, submitted.text
    job = wait_for_status(world.analyst, submitted.json()["id"], {"succeeded", "failed"}, 300)
    model = world.analyst.get(f"/v1/jobs/{job['id']}/model", params={"format": "onnx"})
    card = world.analyst.get(f"/v1/jobs/{job['id']}/model/card").json()
    signed = world.analyst.get(f"/v1/jobs/{job['id']}/receipt")
    receipt = signed.json()["receipt"]
    keys = world.analyst.get("/.well-known/ppml-signing-keys.json").content
    entries = [e for e in _ledger(world) if e["job_id"] == job["id"]]
    # assert: its answers were reserved at admission and committed whole
    assert job["status"] == "succeeded", job
    assert quote["epsilon"] > 0 and job["privacy"]["queries"] == 20
    assert [e["kind"] for e in entries] == ["reserve", "commit", "release"]
    assert entries[1]["epsilon"] == pytest.approx(quote["epsilon"])
    assert job["privacy"]["epsilon_spent"] == pytest.approx(quote["epsilon"])
    assert model.status_code == 200 and len(model.content) > 0
    assert card["privacy"]["epsilon"] == pytest.approx(quote["epsilon"])
    (mechanism,) = receipt["privacy"]["mechanisms"]
    assert mechanism["mechanism"] == "gnmax" and mechanism["queries"] == 20
    # not even the teachers' digest leaves: the card and the receipt show the student's
    assert set(card["artifacts"]) == {"safetensors", "onnx"}
    assert set(receipt["artifacts"]) == {"safetensors", "onnx"}
    onnx = tmp_path / "student.onnx"
    onnx.write_bytes(model.content)
    assert check_receipt(onnx, signed.content, keys).ok  # offline, as users verify
    wrong = world.analyst.post(
        "/v1/jobs",
        json={
            **spec,
            "pate": {
                **spec["pate"],
                "student": {"public_dataset_id": world.dataset_id, "queries": 5},
            },
        },
    )
    assert wrong.status_code == 422, wrong.text


def test_concurrent_batches_never_overspend_and_a_spent_budget_is_a_409(world: World) -> None:
    # arrange: batches of 5 from 8 threads at once, until the budget refuses them
    job_id = world.job["id"]

    def ask(_: int) -> httpx.Response:
        with httpx.Client(base_url=str(world.analyst.base_url), timeout=60) as client:
            client.headers.update(world.analyst.headers)
            return _predict(client, job_id, world.rows[:5])

    # act
    answers = []
    for _round in range(6):
        with ThreadPoolExecutor(8) as pool:
            answers += list(pool.map(ask, range(8)))
        if any(a.status_code == 409 for a in answers):
            break
    before = _ledger(world)
    refused = _predict(world.analyst, job_id, world.rows[:5])
    budget = world.owner.get(f"/v1/datasets/{world.dataset_id}/budget").json()
    # assert
    assert {a.status_code for a in answers} == {200, 409}, {a.text for a in answers}
    assert refused.status_code == 409 and refused.headers["content-type"].startswith(
        "application/problem+json"
    )
    problem = refused.json()
    assert problem["type"].endswith("budget-exceeded")
    assert 0 <= problem["epsilon_remaining"] < problem["epsilon_requested"]
    assert _ledger(world) == before  # a refusal writes nothing
    assert budget["epsilon_spent"] <= BUDGET["epsilon"]
    commits = [e for e in before if e["job_id"] == job_id and e["kind"] == "commit"]
    answered = sum(1 for a in answers if a.status_code == 200)
    total = world.analyst.get(f"/v1/jobs/{job_id}").json()["privacy"]["queries"]
    assert total == 11 + 5 * answered  # the earlier tests' 5 + 4 + 2, then these
    assert len(commits) == 3 + answered


def test_wrong_requests_are_clear_4xx_problems(world: World) -> None:
    # arrange
    ds = world.dataset_id
    # act
    answers = [
        world.analyst.post("/v1/jobs", json={**_spec(ds), "privacy": {"target_epsilon": 1.0}}),
        world.analyst.post("/v1/jobs", json=_spec(ds, sigma=5.0)),
        world.analyst.post("/v1/jobs", json=_spec(ds, teachers=100_000)),
        _predict(world.analyst, world.job["id"], [[1.0, 2.0]]),
    ]
    # assert
    assert [a.status_code for a in answers] == [422, 422, 422, 422], [a.text for a in answers]
    assert all(a.headers["content-type"] == "application/problem+json" for a in answers)


def _client_unit_dataset(owner: httpx.Client) -> str:
    rng = np.random.default_rng(0)
    form = {
        "name": "clients",
        "client_column": "clients",
        "epsilon": "4",
        "delta": "1e-3",
        "privacy_unit": "client",
        "schema": '{"classes": ["0", "1"]}',
    }
    arrays = {"x": rng.random((300, 4)), "y": rng.integers(0, 2, 300)}
    return _upload(owner, form, {**arrays, "clients": np.arange(300) % 30})


def test_pate_is_refused_on_client_unit_and_public_data(world: World) -> None:
    # arrange
    clients = _client_unit_dataset(world.owner)
    body = {"name": "pub", "source": {"builtin": "digits"}, "privacy_budget": None}
    public = world.analyst.post("/v1/datasets", json=body)
    assert public.status_code == 201, public.text
    # act
    answers = [
        world.analyst.post("/v1/jobs", json=_spec(clients)),
        world.analyst.post("/v1/jobs", json=_spec(public.json()["id"])),
    ]
    # assert
    assert [a.status_code for a in answers] == [422, 422], [a.text for a in answers]
    assert "clients" in answers[0].json()["detail"]
    assert answers[0].json()["field"] == "kind"
