"""What the audit and deletion tests share: a job that trains in seconds, and a tenant's
audit trail read through the API."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def tiny_spec(dataset_id: str, *, name: str = "tiny") -> dict[str, Any]:
    """A one-epoch logistic regression: seconds to train."""
    return {
        "name": name,
        "dataset_id": dataset_id,
        "model": {"arch": "logreg"},
        "training": {"epochs": 1, "batch_size": 64, "learning_rate": 0.1, "seed": 0},
        "privacy": {"target_epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 1.0},
        "federated": None,
    }


def trail(client: TestClient, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    answer = client.get("/v1/audit", params={"page_size": 200, **params}, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["next_page_token"] is None
    return list(answer.json()["items"])
