"""The audit trail: each action with the key and role that did it; who may read it; export."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from ppml.config import Settings
from ppml.db.session import Database
from ppml.jobs.runner import JobRunner
from tests.conftest import admin_headers, new_key, new_tenant, new_tenant_id, register_digits
from tests.integration.audit_helpers import tiny_spec, trail

CSV = ("age,dose,label\n" + "".join(f"{i},0.{i},{'ab'[i % 2]}\n" for i in range(60))).encode()


def _seen(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    fields = ("action", "object_id", "actor_role", "actor_key_id")
    return sorted(tuple(e[f] for f in fields) for e in events)


def test_each_action_is_recorded_with_the_key_and_role_that_did_it(
    client: TestClient, database: Database, settings: Settings
) -> None:
    # arrange: the admin makes the tenant and its keys
    tenant_id = new_tenant_id(client)
    owner, analyst = new_key(client, tenant_id, "owner"), new_key(client, tenant_id, "analyst")
    new_key(client, tenant_id, "analyst")  # a spare, for the owner to revoke
    keys = client.get("/v1/api-keys", headers=owner).json()["items"]  # newest first
    owner_id = next(k["id"] for k in keys if k["role"] == "owner")
    analyst_id, spare_id = (k["id"] for k in reversed(keys) if k["role"] == "analyst")
    # act: the owner registers data, the analyst uploads public data and trains
    dataset_id = register_digits(client, owner)
    upload = client.post(
        "/v1/datasets/upload",
        headers=analyst,
        data={"name": "public", "target": "label"},
        files={"file": ("p.csv", CSV)},
    )
    job_id = client.post("/v1/jobs", json=tiny_spec(dataset_id), headers=analyst).json()["id"]
    replayed = [
        client.post(
            "/v1/jobs",
            json=tiny_spec(dataset_id, name="other"),
            headers={**analyst, "Idempotency-Key": "k1"},
        ).json()["id"]
        for _ in range(2)
    ]
    cancelled = client.post(f"/v1/jobs/{replayed[0]}/cancel", headers=analyst)
    assert JobRunner(database, settings).run(job_id) == "succeeded"
    downloads = [
        client.get(f"/v1/jobs/{job_id}/model", params={"format": fmt}, headers=analyst)
        for fmt in ("safetensors", "onnx")
    ]
    predicted = client.post(
        f"/v1/jobs/{job_id}/predict", json={"inputs": [[0.0] * 64]}, headers=owner
    )
    by_owner = client.get(f"/v1/jobs/{job_id}/model", params={"format": "onnx"}, headers=owner)
    revoked = client.delete(f"/v1/api-keys/{spare_id}", headers=owner)
    # assert
    assert upload.status_code == 202 and cancelled.status_code == 202, cancelled.text
    assert replayed[0] == replayed[1] and by_owner.status_code == 200
    assert [d.status_code for d in downloads] == [200, 200] and predicted.status_code == 200
    assert revoked.status_code == 204
    events = trail(client, owner)
    assert _seen(events) == sorted(
        [
            ("tenant.create", tenant_id, "admin", None),
            ("key.create", owner_id, "admin", None),
            ("key.create", analyst_id, "admin", None),
            ("key.create", spare_id, "admin", None),
            ("dataset.register", dataset_id, "owner", owner_id),
            ("dataset.upload", upload.json()["id"], "analyst", analyst_id),
            ("job.submit", job_id, "analyst", analyst_id),
            ("job.submit", replayed[0], "analyst", analyst_id),  # once: the replay is not
            ("job.cancel", replayed[0], "analyst", analyst_id),
            ("model.download", job_id, "analyst", analyst_id),
            ("model.download", job_id, "analyst", analyst_id),
            ("model.predict", job_id, "owner", owner_id),
            ("model.download", job_id, "owner", owner_id),
            ("key.revoke", spare_id, "owner", owner_id),
        ]
    )
    assert all(e["tenant_id"] == tenant_id for e in events)
    formats = sorted(e["detail"]["format"] for e in events if e["action"] == "model.download")
    assert formats == ["onnx", "onnx", "safetensors"]
    submitted = next(e for e in events if e["object_id"] == job_id and e["action"] == "job.submit")
    assert submitted["object_type"] == "job" and submitted["detail"]["dataset_id"] == dataset_id
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)  # oldest first


def test_owners_read_their_tenants_trail_analysts_get_403_and_the_admin_reads_any(
    client: TestClient,
) -> None:
    # arrange: two tenants, each with a dataset
    tenant_id = new_tenant_id(client)
    owner, analyst = new_key(client, tenant_id, "owner"), new_key(client, tenant_id, "analyst")
    other = new_tenant(client)
    mine, theirs = register_digits(client, owner), register_digits(client, other)
    # act
    own = trail(client, owner)
    by_analyst = client.get("/v1/audit", headers=analyst)
    foreign = trail(client, other, object_id=mine)
    by_admin = client.get(f"/v1/tenants/{tenant_id}/audit", headers=admin_headers())
    missing = client.get("/v1/tenants/ten_missing/audit", headers=admin_headers())
    registered = trail(client, owner, action="dataset.register")
    typo = client.get("/v1/audit", params={"action": "dataset.registr"}, headers=owner)
    pages, token = [], None
    while True:
        params = {"page_size": 2, **({"page_token": token} if token else {})}
        page = client.get("/v1/audit", params=params, headers=owner).json()
        pages += page["items"]
        if (token := page["next_page_token"]) is None:
            break
    # assert
    assert theirs not in {e["object_id"] for e in own}
    assert by_analyst.status_code == 403
    assert by_analyst.headers["content-type"] == "application/problem+json"
    assert foreign == []
    assert by_admin.status_code == 200 and by_admin.json()["items"] == own
    assert missing.status_code == 404
    assert [e["object_id"] for e in registered] == [mine]
    assert typo.status_code == 422 and typo.json()["field"] == "action"
    assert pages == own


def test_the_trail_exports_as_json_lines(client: TestClient) -> None:
    # arrange
    tenant_id = new_tenant_id(client)
    owner = new_key(client, tenant_id, "owner")
    register_digits(client, owner)
    page = trail(client, owner)
    # act
    by_format = client.get("/v1/audit", params={"format": "jsonl"}, headers=owner)
    by_accept = client.get("/v1/audit", headers={**owner, "Accept": "application/x-ndjson"})
    after_first = client.get(
        "/v1/audit", params={"format": "jsonl", "page_token": page[0]["id"]}, headers=owner
    )
    by_admin = client.get(
        f"/v1/tenants/{tenant_id}/audit", params={"format": "jsonl"}, headers=admin_headers()
    )
    # assert
    for answer in (by_format, by_accept, after_first, by_admin):
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        assert answer.text.endswith("\n")
    lines = [json.loads(line) for line in by_format.text.splitlines()]
    assert lines == page and len(lines) == 3  # tenant, key, dataset
    assert by_accept.text == by_format.text == by_admin.text
    assert [json.loads(line) for line in after_first.text.splitlines()] == page[1:]


def test_no_route_changes_or_removes_audit_events(client: TestClient) -> None:
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    audit_routes = {path: set(ops) for path, ops in paths.items() if path.endswith("/audit")}
    assert audit_routes == {"/v1/audit": {"get"}, "/v1/tenants/{tenant_id}/audit": {"get"}}
