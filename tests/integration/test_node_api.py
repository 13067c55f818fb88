"""The node API driven against the app (#16): jobs on a federation, the long poll, weights,
update checks (rejected and recorded, stale), refusals."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
from fastapi.testclient import TestClient
from httpx import Response

from ppml.config import Settings
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.federation.keys import update_key
from ppml.jobs.federation import StoreChannel
from ppml.services import federations as service
from ppml.storage import ArtifactStore
from tests.conftest import new_tenant
from tests.integration.federation_helpers import (
    create_federation,
    enrolled_node,
    federated_job,
    open_round,
    task_status,
    tensors_bytes,
    zeros,
)

PROBLEM = "application/problem+json"


def _upload(client: TestClient, node: dict[str, str], task_id: str, body: bytes) -> Response:
    return client.post(
        f"/v1/node/tasks/{task_id}/update",
        content=body,
        headers={**node, "Content-Type": "application/octet-stream"},
    )


def test_a_job_on_a_record_federation_is_charged_at_the_nodes(client: TestClient) -> None:
    owner = new_tenant(client)
    federation = create_federation(client, owner)
    enrolled_node(client, owner, federation["id"], "a", rows=500)
    enrolled_node(client, owner, federation["id"], "b", rows=300)
    job = federated_job(client, owner, federation["id"])
    assert job["dataset_id"] == federation["dataset_id"]
    assert job["spec"]["federated"]["num_clients"] == 2
    assert job["spec"]["federated"]["clients_per_round"] == 2
    assert job["privacy"]["charged_at"] == "nodes"
    ledger = client.get(f"/v1/datasets/{federation['dataset_id']}/ledger", headers=owner)
    assert ledger.json()["items"] == []


def test_a_client_level_job_reserves_on_the_federation_budget(client: TestClient) -> None:
    owner = new_tenant(client)
    budget = {"epsilon": 8.0, "delta": 1e-3}
    federation = create_federation(client, owner, unit="client", budget=budget)
    for name in ("a", "b", "c"):
        enrolled_node(client, owner, federation["id"], name)
    job = federated_job(client, owner, federation["id"], level="client")
    assert job["privacy"]["charged_at"] == "service" and job["privacy"]["unit"] == "client"
    read = client.get(f"/v1/federations/{federation['id']}", headers=owner).json()
    assert read["budget"]["epsilon_reserved"] > 0


def test_job_specs_on_a_federation_refuse_simulation_fields(client: TestClient) -> None:
    owner = new_tenant(client)
    federation = create_federation(client, owner)
    spec = {
        "name": "fed",
        "model": {"arch": "logreg"},
        "training": {"epochs": 1, "batch_size": 32, "learning_rate": 0.1},
        "privacy": {"target_epsilon": 2.0, "level": "sample"},
        "federated": {"federation_id": federation["id"], "rounds": 2},
    }
    no_nodes = client.post("/v1/jobs", json=spec, headers=owner)
    assert no_nodes.status_code == 409 and "no active node" in no_nodes.json()["detail"]
    enrolled_node(client, owner, federation["id"], "a")
    bad = {**spec, "federated": {**spec["federated"], "num_clients": 3}}  # type: ignore[dict-item]
    refused = client.post("/v1/jobs", json=bad, headers=owner)
    assert refused.status_code == 422 and refused.json()["field"] == "federated.num_clients"
    other = client.post(
        "/v1/jobs",
        json={**spec, "federated": {**spec["federated"], "federation_id": "fed_nope"}},  # type: ignore[dict-item]
        headers=owner,
    )
    assert other.status_code == 404 and other.headers["content-type"].startswith(PROBLEM)


def test_a_long_poll_returns_a_task_opened_while_it_waits(
    client: TestClient, settings: Settings, database: Database
) -> None:
    # arrange
    owner = new_tenant(client)
    federation = create_federation(client, owner)
    node_id, node = enrolled_node(client, owner, federation["id"], "a", rows=400)
    job = federated_job(client, owner, federation["id"])
    answers: list[Response] = []
    poller = threading.Thread(
        target=lambda: answers.append(
            client.post("/v1/node/poll", json={"wait_s": 10}, headers=node)
        )
    )
    # act
    started = time.monotonic()
    poller.start()
    time.sleep(1.0)
    (task,) = open_round(settings, database, job_id=job["id"], federation_id=federation["id"])
    poller.join(15)
    # assert
    assert time.monotonic() - started < 5
    (answer,) = answers
    assert answer.status_code == 200, answer.text
    sent = answer.json()["task"]
    assert sent["id"] == task.id and sent["job_id"] == job["id"] and sent["round"] == 0
    assert sent["mode"] == "sample" and sent["rounds"] == 3
    assert sent["num_features"] == 4 and sent["num_classes"] == 2
    privacy = sent["privacy"]
    assert privacy["sample_rate"] == 32 / 400 and privacy["steps"] == 13
    assert privacy["noise_multiplier"] > 0 and privacy["delta"] == 1e-5
    weights = client.get(f"/v1/node/tasks/{task.id}/weights", headers=node).content
    assert hashlib.sha256(weights).hexdigest() == sent["weights_sha256"]
    seen = client.get(f"/v1/federations/{federation['id']}", headers=owner).json()["nodes"]
    assert seen[0]["id"] == node_id and seen[0]["online"] is True


def test_polls_are_capped(client: TestClient) -> None:
    owner = new_tenant(client)
    federation = create_federation(client, owner)
    _, node = enrolled_node(client, owner, federation["id"], "a")
    too_long = client.post("/v1/node/poll", json={"wait_s": 26}, headers=node)
    assert too_long.status_code == 422 and too_long.json()["field"] == "wait_s"
    answers: list[int] = []
    pollers = [
        threading.Thread(
            target=lambda: answers.append(
                client.post("/v1/node/poll", json={"wait_s": 2}, headers=node).status_code
            )
        )
        for _ in range(3)
    ]
    for poller in pollers:
        poller.start()
        time.sleep(0.2)
    for poller in pollers:
        poller.join(10)
    assert sorted(answers) == [204, 204, 429]


def test_updates_are_checked_recorded_and_stored(
    client: TestClient, settings: Settings, database: Database
) -> None:
    # arrange: three rounds' tasks for one node
    owner = new_tenant(client)
    federation = create_federation(client, owner)
    node_id, node = enrolled_node(client, owner, federation["id"], "a")
    job = federated_job(client, owner, federation["id"])
    tasks = [
        open_round(settings, database, job_id=job["id"], federation_id=federation["id"], round_=r)[
            0
        ]
        for r in range(4)
    ]
    eps = {"epsilon": "0.5", "epsilon_total": "0.5"}
    wrong_shape = {
        "linear.weight": np.zeros((2, 5), np.float32),
        "linear.bias": zeros()["linear.bias"],
    }
    nan = zeros()
    nan["linear.bias"][0] = np.nan
    cases = [
        (tasks[0].id, tensors_bytes(wrong_shape, eps), "shape"),
        (tasks[1].id, tensors_bytes(nan, eps), "NaN"),
        (tasks[2].id, tensors_bytes(zeros(0.01), None), "epsilon"),
    ]
    # act / assert: each malformed update is a 422 and its task is rejected with the reason
    for task_id, body, reason in cases:
        answer = _upload(client, node, task_id, body)
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"].startswith(PROBLEM)
        assert answer.json()["type"].endswith("malformed-update")
        status, detail = task_status(database, task_id)
        assert status == "rejected" and detail is not None and reason in detail
    weights = client.get(f"/v1/node/tasks/{tasks[3].id}/weights", headers=node)
    assert weights.status_code == 200 and weights.content == tensors_bytes(zeros())
    update = tensors_bytes(zeros(0.01), eps)
    accepted = _upload(client, node, tasks[3].id, update)
    assert accepted.status_code == 202 and accepted.json() == {"status": "accepted"}
    with database.session() as session:
        stored = Repositories(session).task(tasks[3].id)
        assert stored is not None
        assert (stored.status, stored.epsilon, stored.rows) == ("accepted", 0.5, 400)
    assert stored.update_key is not None
    assert stored.update_key.startswith(
        update_key(job["id"], 3, node_id, "").removesuffix(".safetensors")
    )
    with ArtifactStore.for_settings(settings).open_plain(stored.update_key) as path:
        assert path.read_bytes() == update
    again = _upload(client, node, tasks[3].id, update)
    assert again.status_code == 409


def test_the_workers_channel_hands_over_each_openings_own_update(
    client: TestClient, settings: Settings, database: Database
) -> None:
    # arrange: the worker's channel opens a round for one node
    owner = new_tenant(client)
    federation = create_federation(client, owner)
    node_id, node = enrolled_node(client, owner, federation["id"], "a")
    job = federated_job(client, owner, federation["id"])
    with database.session() as session:
        row = Repositories(session).job_by_id(job["id"])
    assert row is not None
    channel = StoreChannel(database, ArtifactStore.for_settings(settings), row)
    weights, eps = tensors_bytes(zeros()), {"epsilon": "0.5", "epsilon_total": "0.5"}
    channel.open_round(0, [node_id], weights, 60)
    first, second = tensors_bytes(zeros(0.01), eps), tensors_bytes(zeros(0.02), eps)
    # act / assert: the accepted update, at every look (it is read once and kept)
    assert _upload(client, node, next(iter(channel.opened[0])), first).status_code == 202
    assert [a.update for a in channel.answers(0)] == [first]
    assert [a.update for a in channel.answers(0)] == [first]
    # act / assert: opened again (short of a quorum), the round hands over the new update
    channel.open_round(0, [node_id], weights, 60)
    assert _upload(client, node, next(iter(channel.opened[0])), second).status_code == 202
    assert [a.update for a in channel.answers(0)] == [second]


def test_a_closed_round_answers_stale(
    client: TestClient, settings: Settings, database: Database
) -> None:
    owner = new_tenant(client)
    federation = create_federation(client, owner)
    _, node = enrolled_node(client, owner, federation["id"], "a")
    job = federated_job(client, owner, federation["id"])
    (task,) = open_round(settings, database, job_id=job["id"], federation_id=federation["id"])
    with database.session(write=True) as session:
        assert service.close_round(Repositories(session), job["id"], 0) == 1
    late = _upload(client, node, task.id, tensors_bytes(zeros(), {"epsilon": "0.1"}))
    assert late.status_code == 409 and late.headers["content-type"].startswith(PROBLEM)
    assert client.get(f"/v1/node/tasks/{task.id}/weights", headers=node).status_code == 409
    assert task_status(database, task.id)[0] == "expired"
    assert client.post("/v1/node/poll", json={"wait_s": 0}, headers=node).status_code == 204


def test_client_mode_updates_over_the_norm_are_rejected(
    client: TestClient, settings: Settings, database: Database
) -> None:
    owner = new_tenant(client)
    budget = {"epsilon": 8.0, "delta": 1e-3}
    federation = create_federation(client, owner, unit="client", budget=budget)
    for name in ("a", "b", "c"):
        _, node = enrolled_node(client, owner, federation["id"], name)
    job = federated_job(client, owner, federation["id"], level="client")
    tasks = open_round(settings, database, job_id=job["id"], federation_id=federation["id"])
    mine = client.post("/v1/node/poll", json={"wait_s": 0}, headers=node).json()["task"]
    assert mine["mode"] == "client" and mine["privacy"] == {"clip_norm": 1.0}
    big = _upload(client, node, mine["id"], tensors_bytes(zeros(1.0)))  # norm sqrt(10) > 1.01
    assert big.status_code == 422 and "norm" in big.json()["detail"]
    assert task_status(database, mine["id"])[0] == "rejected"
    assert len(tasks) == 3


def test_a_node_refuses_a_task(client: TestClient, settings: Settings, database: Database) -> None:
    owner = new_tenant(client)
    federation = create_federation(client, owner)
    node_id, node = enrolled_node(client, owner, federation["id"], "a")
    job = federated_job(client, owner, federation["id"])
    (task,) = open_round(settings, database, job_id=job["id"], federation_id=federation["id"])
    body = {"reason": "budget", "message": "would spend ε=2 but this node has ε=1 left"}
    refused = client.post(f"/v1/node/tasks/{task.id}/refuse", json=body, headers=node)
    assert refused.status_code == 200
    assert task_status(database, task.id) == ("refused", f"budget: {body['message']}")
    _, other = enrolled_node(client, owner, federation["id"], "b")
    assert (
        client.post(f"/v1/node/tasks/{task.id}/refuse", json=body, headers=other).status_code == 404
    )
    assert node_id
