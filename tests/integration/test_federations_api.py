"""The owner's federation routes and enrolment of nodes (#16)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import new_key, new_tenant, new_tenant_id
from tests.integration.federation_helpers import (
    SCHEMA,
    create_federation,
    enrol_body,
    enrolled_node,
    invite,
)

PROBLEM = "application/problem+json"


def test_an_owner_creates_lists_and_reads_a_federation(client: TestClient) -> None:
    # arrange
    owner = new_tenant(client)
    # act
    created = create_federation(client, owner)
    listed = client.get("/v1/federations", headers=owner).json()
    read = client.get(f"/v1/federations/{created['id']}", headers=owner).json()
    # assert
    assert created["id"].startswith("fed_") and created["privacy_unit"] == "record"
    assert created["schema"]["features"] == SCHEMA["features"]
    assert created["budget"] is None and created["nodes"] == []
    assert [f["id"] for f in listed["items"]] == [created["id"]]
    assert read == created
    datasets = client.get("/v1/datasets", headers=owner).json()["items"]
    assert datasets == []  # the backing dataset is never listed
    backing = f"/v1/datasets/{created['dataset_id']}"
    assert client.delete(backing, headers=owner).status_code == 409


def test_a_client_unit_federation_shows_its_budget(client: TestClient) -> None:
    owner = new_tenant(client)
    created = create_federation(client, owner, unit="client", budget={"epsilon": 4, "delta": 1e-3})
    assert created["budget"]["epsilon_total"] == 4
    assert created["budget"]["epsilon_remaining"] == 4


def test_user_errors_are_problems(client: TestClient) -> None:
    owner = new_tenant(client)
    cases = [
        {"name": "f", "schema": SCHEMA, "privacy_unit": "client"},  # no budget
        {
            "name": "f",
            "schema": SCHEMA,
            "privacy_unit": "record",
            "budget": {"epsilon": 1, "delta": 1e-5},
        },
        {"name": "f", "schema": {"classes": ["a", "b"]}, "privacy_unit": "record"},
        {"name": "f", "schema": {**SCHEMA, "features": ["a", "a"]}, "privacy_unit": "record"},
        {"name": "", "schema": SCHEMA, "privacy_unit": "record"},
    ]
    for body in cases:
        response = client.post("/v1/federations", json=body, headers=owner)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"].startswith(PROBLEM)
        assert response.json()["detail"]
    budgetless = client.post("/v1/federations", json=cases[0], headers=owner).json()
    assert budgetless["field"] == "budget"


def test_an_analyst_may_read_but_not_create(client: TestClient) -> None:
    tenant_id = new_tenant_id(client)
    owner, analyst = new_key(client, tenant_id), new_key(client, tenant_id, "analyst")
    created = create_federation(client, owner)
    body = {"name": "f", "schema": SCHEMA, "privacy_unit": "record"}
    refused = client.post("/v1/federations", json=body, headers=analyst)
    assert refused.status_code == 403 and refused.headers["content-type"].startswith(PROBLEM)
    invite_refused = client.post(
        f"/v1/federations/{created['id']}/nodes", json={"name": "n"}, headers=analyst
    )
    assert invite_refused.status_code == 403
    assert client.get(f"/v1/federations/{created['id']}", headers=analyst).status_code == 200


def test_another_tenants_federation_is_not_found(client: TestClient) -> None:
    owner, other = new_tenant(client), new_tenant(client)
    created = create_federation(client, owner)
    node_id, _ = enrolled_node(client, owner, created["id"], "n1")
    base = f"/v1/federations/{created['id']}"
    answers = [
        client.get(base, headers=other),
        client.post(f"{base}/nodes", json={"name": "x"}, headers=other),
        client.delete(f"{base}/nodes/{node_id}", headers=other),
    ]
    for answer in answers:
        assert answer.status_code == 404, answer.text
        assert answer.headers["content-type"].startswith(PROBLEM)
    assert client.get("/v1/federations", headers=other).json()["items"] == []


def test_an_enrolment_token_is_shown_once_and_used_once(client: TestClient) -> None:
    # arrange
    owner = new_tenant(client)
    federation = create_federation(client, owner)
    token = invite(client, owner, federation["id"], "clinic-a")
    # act
    schema = client.post("/v1/node/schema", json={"enrolment_token": token})
    first = client.post("/v1/node/enrol", json=enrol_body(token, rows=321))
    again = client.post("/v1/node/enrol", json=enrol_body(token))
    # assert
    assert schema.status_code == 200 and schema.json()["schema"] == federation["schema"]
    assert first.status_code == 201, first.text
    assert first.json()["credential"].startswith("ppml_node_")
    assert again.status_code == 401 and again.headers["content-type"].startswith(PROBLEM)
    read = client.get(f"/v1/federations/{federation['id']}", headers=owner)
    assert token not in read.text
    (node,) = read.json()["nodes"]
    assert node["status"] == "active" and node["online"] is True
    assert node["software_version"] == "0.1.0"
    assert node["schema_check"] == {"ok": True, "rows": 321, "message": ""}


def test_a_node_whose_data_does_not_match_is_refused_clearly(client: TestClient) -> None:
    owner = new_tenant(client)
    federation = create_federation(client, owner, name="hospitals")
    token = invite(client, owner, federation["id"], "clinic-b")
    body = enrol_body(token, ok=False, message="column 'weight' is missing")
    refused = client.post("/v1/node/enrol", json=body)
    assert refused.status_code == 422
    assert refused.headers["content-type"].startswith(PROBLEM)
    assert refused.json()["type"].endswith("schema-mismatch")
    assert refused.json()["detail"] == (
        "this node's data does not match federation hospitals's schema: column 'weight' is missing"
    )
    (node,) = client.get(f"/v1/federations/{federation['id']}", headers=owner).json()["nodes"]
    assert node["status"] == "refused" and node["schema_check"]["ok"] is False
    assert client.post("/v1/node/enrol", json=enrol_body(token)).status_code == 401


def test_unknown_tokens_are_401(client: TestClient) -> None:
    for path in ("/v1/node/schema", "/v1/node/enrol"):
        body = (
            enrol_body("ppml_enrol_nope")
            if path.endswith("enrol")
            else {"enrolment_token": "ppml_enrol_nope"}
        )
        answer = client.post(path, json=body)
        assert answer.status_code == 401 and answer.headers["content-type"].startswith(PROBLEM)


def test_keys_and_credentials_stay_on_their_own_routes(client: TestClient) -> None:
    owner = new_tenant(client)
    federation = create_federation(client, owner)
    _, node = enrolled_node(client, owner, federation["id"], "n1")
    assert client.post("/v1/node/poll", json={"wait_s": 0}, headers=owner).status_code == 401
    assert client.post("/v1/node/poll", json={"wait_s": 0}, headers=node).status_code == 204
    refused = client.get("/v1/datasets", headers=node)
    assert refused.status_code == 401
    assert "only on /v1/node/" in refused.json()["detail"]


def test_a_revoked_node_is_refused_at_once(client: TestClient) -> None:
    owner = new_tenant(client)
    federation = create_federation(client, owner)
    node_id, node = enrolled_node(client, owner, federation["id"], "n1")
    gone = client.delete(f"/v1/federations/{federation['id']}/nodes/{node_id}", headers=owner)
    assert gone.status_code == 204
    assert client.post("/v1/node/poll", json={"wait_s": 0}, headers=node).status_code == 401
    (view,) = client.get(f"/v1/federations/{federation['id']}", headers=owner).json()["nodes"]
    assert view["status"] == "revoked"
    again = client.delete(f"/v1/federations/{federation['id']}/nodes/{node_id}", headers=owner)
    assert again.status_code == 204
