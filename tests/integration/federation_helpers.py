"""What the federation tests share: a federation, invited and enrolled nodes, a job on it,
its global weights in the store and a round's tasks opened as the server loop opens them."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from safetensors.numpy import save

from ppml.config import Settings
from ppml.db.federations import FederationTask
from ppml.db.models import utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.federation.keys import global_key
from ppml.services import federations as service
from ppml.storage import ArtifactStore

SCHEMA = {"classes": ["no", "yes"], "features": ["age", "income", "height", "weight"]}
#: The global weights of a logreg on 4 features and 2 classes (state_dict names).
SHAPES = {"linear.weight": (2, 4), "linear.bias": (2,)}


def create_federation(
    client: TestClient,
    headers: dict[str, str],
    *,
    unit: str = "record",
    budget: dict[str, float] | None = None,
    name: str = "hospitals",
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "schema": SCHEMA, "privacy_unit": unit}
    if budget is not None:
        body["budget"] = budget
    response = client.post("/v1/federations", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


def invite(client: TestClient, headers: dict[str, str], federation_id: str, name: str) -> str:
    response = client.post(
        f"/v1/federations/{federation_id}/nodes", json={"name": name}, headers=headers
    )
    assert response.status_code == 201, response.text
    return str(response.json()["enrolment_token"])


def enrol_body(
    token: str, *, ok: bool = True, rows: int = 400, message: str = ""
) -> dict[str, Any]:
    return {
        "enrolment_token": token,
        "software_version": "0.1.0",
        "schema_check": {"ok": ok, "rows": rows, "message": message},
    }


def enrolled_node(
    client: TestClient, headers: dict[str, str], federation_id: str, name: str, rows: int = 400
) -> tuple[str, dict[str, str]]:
    """A new active node: its id and its credential's auth headers."""
    token = invite(client, headers, federation_id, name)
    response = client.post("/v1/node/enrol", json=enrol_body(token, rows=rows))
    assert response.status_code == 201, response.text
    body = response.json()
    return str(body["node_id"]), {"Authorization": f"Bearer {body['credential']}"}


def federated_job(
    client: TestClient, headers: dict[str, str], federation_id: str, *, level: str = "sample"
) -> dict[str, Any]:
    spec = {
        "name": "fed",
        "model": {"arch": "logreg"},
        "training": {"epochs": 1, "batch_size": 32, "learning_rate": 0.1},
        "privacy": {"target_epsilon": 2.0, "max_grad_norm": 1.0, "level": level},
        "federated": {"federation_id": federation_id, "rounds": 3},
    }
    if level == "client":
        spec["privacy"]["delta"] = 1e-3  # type: ignore[index]
    response = client.post("/v1/jobs", json=spec, headers=headers)
    assert response.status_code == 202, response.text
    return dict(response.json())


def tensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    return save(tensors, metadata=metadata)


def zeros(scale: float = 0.0) -> dict[str, np.ndarray]:
    return {name: np.full(shape, scale, dtype=np.float32) for name, shape in SHAPES.items()}


def open_round(
    settings: Settings,
    db: Database,
    *,
    job_id: str,
    federation_id: str,
    round_: int = 0,
    timeout_s: float = 60,
) -> list[FederationTask]:
    """What the server loop does: store the global weights, open a task per active node."""
    store = ArtifactStore.for_settings(settings)
    weights = tensors_bytes(zeros())
    store.write(global_key(job_id, round_), lambda path: path.write_bytes(weights))
    with db.session(write=True) as session:
        repos = Repositories(session)
        job = repos.job_by_id(job_id)
        federation = repos.federation_by_id(federation_id)
        assert job is not None and federation is not None
        return service.open_tasks(
            repos,
            job_id=job_id,
            spec=job.spec,
            federation=federation,
            round_=round_,
            nodes=repos.active_nodes(federation.id),
            deadline=utcnow() + timedelta(seconds=timeout_s),
            # Of the plain bytes the node downloads (the store seals this kind at rest).
            weights_sha256=hashlib.sha256(weights).hexdigest(),
        )


def task_status(db: Database, task_id: str) -> tuple[str, str | None]:
    with db.session() as session:
        task = Repositories(session).task(task_id)
        assert task is not None
        return task.status, task.detail
