"""Tenant isolation: every route with an id in its path answers 404 to another tenant.

The routes come from the app itself, so a new route with an id fails here until it has a case.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import dp_job_spec, new_tenant, register_digits
from tests.integration.federation_helpers import create_federation, enrolled_node

# Body to send for each (method, path template); routes not listed send no body.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/jobs/{job_id}/predict"): {"inputs": [[0.0] * 64]},
    ("POST", "/v1/datasets/{dataset_id}/statistics"): {"epsilon": 0.1},
    ("POST", "/v1/federations/{federation_id}/nodes"): {"name": "intruder"},
}
# Admin routes (under /v1/tenants) are scoped by the admin token, not by tenant; node routes
# (under /v1/node) by a node's credential, and a node reaching another node's task gets the
# same 404 (tests/integration/test_node_api.py).
SCOPED_ELSEWHERE = ("/v1/tenants/", "/v1/node/")


def _id_routes(client: TestClient) -> list[tuple[str, str]]:
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    return [
        (method.upper(), path)
        for path, operations in paths.items()
        if "{" in path and not path.startswith(SCOPED_ELSEWHERE)
        for method in operations
    ]


# An analyst stranger too: an owner-only route must look the object up before the role (404,
# not 403), so another tenant's ids stay indistinguishable from missing ones.
@pytest.mark.parametrize("stranger_role", ["owner", "analyst"])
def test_every_id_route_hides_other_tenants_objects(client: TestClient, stranger_role: str) -> None:
    # arrange: tenant A owns a dataset, a job and a federation with a node; B owns nothing
    owner, stranger = new_tenant(client), new_tenant(client, role=stranger_role)
    dataset_id = register_digits(client, owner)
    job_id = client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=owner).json()["id"]
    key_id = client.get("/v1/api-keys", headers=owner).json()["items"][0]["id"]
    federation_id = create_federation(client, owner)["id"]
    node_id, _ = enrolled_node(client, owner, federation_id, "ward-1")
    ids = {
        "dataset_id": dataset_id,
        "job_id": job_id,
        "key_id": key_id,
        "federation_id": federation_id,
        "node_id": node_id,
    }
    routes = _id_routes(client)
    assert len(routes) >= 8
    for method, template in routes:
        path = re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], template)
        body = BODIES.get((method, template))
        # act
        answer = client.request(method, path, json=body, headers=stranger)
        # assert
        assert answer.status_code == 404, f"{method} {template} answered {answer.status_code}"
        assert answer.headers["content-type"] == "application/problem+json"
    # the owner still sees its objects, unchanged by the stranger's attempts
    keys = client.get("/v1/api-keys", headers=owner).json()["items"]
    assert [k["revoked_at"] for k in keys] == [None]  # its key was not revoked
    job = client.get(f"/v1/jobs/{job_id}", headers=owner).json()
    assert job["status"] == "queued" and not job["cancel_requested"]
    assert [d["id"] for d in client.get("/v1/datasets", headers=stranger).json()["items"]] == []
    assert client.get("/v1/jobs", headers=stranger).json()["items"] == []
    assert client.get("/v1/federations", headers=stranger).json()["items"] == []
    nodes = client.get(f"/v1/federations/{federation_id}", headers=owner).json()["nodes"]
    assert [(n["name"], n["status"]) for n in nodes] == [("ward-1", "active")]  # not revoked
    filtered = client.get("/v1/jobs", params={"dataset_id": dataset_id}, headers=stranger)
    assert filtered.json()["items"] == []
