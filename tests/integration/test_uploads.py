"""Uploads over HTTP: accepted formats, and hostile files refused fast leaving nothing behind."""

from __future__ import annotations

import io
import json
import pickle
import select
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ppml.config import Limits, Settings
from ppml.db.session import Database
from tests.conftest import ADMIN_TOKEN, new_tenant
from tests.integration.stack import BIN, free_port, process, service_env, wait_ready

MAX_UPLOAD = 2 * 1024 * 1024


@pytest.fixture
def small_client(tmp_path: Path, database: Database, database_url: str) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url="memory://",
        admin_token=ADMIN_TOKEN,
        limits=Limits(max_upload_bytes=MAX_UPLOAD, max_active_jobs_per_tenant=2),
    )
    with TestClient(create_app(settings, database)) as client:
        yield client


def _csv(rows: int = 200, secret: str = "") -> bytes:
    rng = np.random.default_rng(0)
    lines = ["age,dose,label"]
    for i in range(rows):
        lines.append(f"{rng.integers(20, 90)},{rng.random():.4f},{'sick' if i % 3 else 'well'}")
    if secret:
        lines.append(f"{secret},0.5,well")
    return ("\n".join(lines) + "\n").encode()


def _upload(
    client: TestClient, headers: dict[str, str], name: str, content: Any, **fields: Any
) -> Any:
    data = {"name": "upload", "target": "label", **{k: str(v) for k, v in fields.items()}}
    return client.post(
        "/v1/datasets/upload", headers=headers, data=data, files={"file": (name, content)}
    )


def _nothing_stored(client: TestClient, headers: dict[str, str], data_dir: Path) -> None:
    assert client.get("/v1/datasets", headers=headers).json()["items"] == []
    leftovers = [p for p in data_dir.rglob("*") if p.is_file() and p.suffix in {".npz", ".upload"}]
    assert leftovers == []


SCHEMA = json.dumps({"classes": ["sick", "well"]})


def test_csv_upload_with_budget_registers_a_dataset(small_client: TestClient) -> None:
    tenant = new_tenant(small_client)
    response = _upload(
        small_client, tenant, "p.csv", _csv(), epsilon=2.0, delta=1e-4, schema=SCHEMA
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["num_features"] == 2 and body["num_classes"] == 2
    assert body["classes"] == ["sick", "well"] and body["schema"] == {"classes": ["sick", "well"]}
    assert body["num_train"] + body["num_test"] == 200 and body["num_test"] > 0
    assert body["privacy_budget"] == {"epsilon": 2.0, "delta": 1e-4}
    assert response.headers["location"] == f"/v1/datasets/{body['id']}"


def test_npz_upload_with_client_column(small_client: TestClient) -> None:
    tenant = new_tenant(small_client)
    buffer = io.BytesIO()
    rng = np.random.default_rng(1)
    np.savez(buffer, x=rng.random((300, 4)), y=rng.integers(0, 3, 300), clients=np.arange(300) % 5)
    response = _upload(small_client, tenant, "d.npz", buffer.getvalue(), client_column="clients")
    assert response.status_code == 201, response.text
    assert response.json()["num_clients"] == 5 and response.json()["privacy_budget"] is None


@pytest.mark.parametrize(
    "case", ["pickle_as_npz", "zip_bomb", "wide_csv", "non_numeric", "one_sided_budget"]
)
def test_hostile_or_malformed_uploads_are_refused_fast_and_leave_nothing(
    small_client: TestClient, tmp_path: Path, case: str
) -> None:
    # arrange
    tenant = new_tenant(small_client)
    secret = "7731982"
    fields: dict[str, Any] = {}
    if case == "pickle_as_npz":
        name, content = "evil.npz", pickle.dumps({"x": [[1.0]], "y": [int(secret)]})
    elif case == "zip_bomb":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("x.npy", b"\0" * (3 * 1024**3 // 1024) * 0 + b"\0" * (64 * 1024**2))
        name, content = "bomb.npz", buffer.getvalue()
    elif case == "wide_csv":
        name, content = "wide.csv", (",".join(f"c{i}" for i in range(200_000)) + "\n").encode()
    elif case == "non_numeric":
        name, content = (
            "p.csv",
            _csv().replace(b"age,", b"name,").replace(b"\n2", b"\nx" + secret.encode() + b"2", 1),
        )
    else:
        name, content, fields = "p.csv", _csv(), {"epsilon": 1.0}
    # act
    started = time.monotonic()
    response = _upload(small_client, tenant, name, content, **fields)
    elapsed = time.monotonic() - started
    # assert
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert secret not in response.text
    assert elapsed < 1.0
    _nothing_stored(small_client, tenant, tmp_path / "data")


def test_oversize_bodies_are_413_before_being_buffered(
    small_client: TestClient, tmp_path: Path
) -> None:
    tenant = new_tenant(small_client)
    # a declared 2 GB body is refused on its Content-Length alone
    declared = small_client.post(
        "/v1/datasets/upload",
        headers={
            **tenant,
            "Content-Length": str(2 * 1024**3),
            "Content-Type": "multipart/form-data; boundary=x",
        },
        content=b"--x--",
    )
    assert declared.status_code == 413
    _nothing_stored(small_client, tenant, tmp_path / "data")


def test_a_streamed_body_is_cut_off_once_it_passes_the_limit(tmp_path: Path) -> None:
    # arrange: a real server (the test client would buffer the whole body before the app)
    port = free_port()
    env = service_env(tmp_path / "data", PPML_ADMIN_TOKEN=ADMIN_TOKEN)
    env["PPML_LIMITS__MAX_UPLOAD_BYTES"] = str(MAX_UPLOAD)
    log = tmp_path / "serve.log"
    with process(
        [str(BIN / "ppml"), "serve", "--no-worker", "--port", str(port)], env, log
    ) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, log)
        key = new_tenant(httpx.Client(base_url=base))["Authorization"]
        head = (
            f"POST /v1/datasets/upload HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        part = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n\r\n'
        head += b"%x\r\n%s\r\n" % (len(part), part)
        chunk = b"1," * (512 * 1024)
        sent, answer = 0, b""
        started = time.monotonic()
        # act: stream up to 2 GB in 1 MB chunks, watching for an early answer
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head)
            while sent < 2048 and not answer:
                try:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                except OSError:
                    break  # the server closed the connection after answering
                sent += 1
                if select.select([sock], [], [], 0)[0]:
                    answer = sock.recv(65536)
            if not answer:
                sock.settimeout(5)
                answer = sock.recv(65536)
    # assert
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 16  # cut off after a few MB, not 2 GB
    assert time.monotonic() - started < 5.0


def test_active_job_cap_answers_429_with_retry_after(small_client: TestClient) -> None:
    tenant = new_tenant(small_client)
    dataset = _upload(small_client, tenant, "p.csv", _csv())
    spec = {
        "name": "j",
        "dataset_id": dataset.json()["id"],
        "model": {"arch": "logreg"},
        "training": {"epochs": 1, "batch_size": 16, "learning_rate": 0.1},
        "privacy": None,
    }
    codes = [small_client.post("/v1/jobs", json=spec, headers=tenant).status_code for _ in range(3)]
    refused = small_client.post("/v1/jobs", json=spec, headers=tenant)
    assert codes == [202, 202, 429]
    assert refused.headers["retry-after"] == "30" and refused.json()["limit"] == 2


# --------------------------------------------------------------------- declared schema


def test_released_classes_are_the_declared_ones(small_client: TestClient) -> None:
    # arrange: a declared class without rows, and an order unlike the data's
    tenant = new_tenant(small_client)
    declared = ["well", "unknown", "sick"]

    # act
    response = _upload(
        small_client,
        tenant,
        "p.csv",
        _csv(),
        epsilon=2.0,
        delta=1e-4,
        schema=json.dumps({"classes": declared}),
    )
    shown = small_client.get(f"/v1/datasets/{response.json()['id']}", headers=tenant)

    # assert: released as declared; the split's secret is never shown
    assert response.status_code == 201, response.text
    for body in (response.json(), shown.json()):
        assert body["classes"] == declared and body["schema"] == {"classes": declared}
        assert body["num_classes"] == 3 and body["num_test_clients"] is None
        assert not any("secret" in key for key in body)


def test_undeclared_label_is_refused_and_nothing_is_stored(
    small_client: TestClient, tmp_path: Path
) -> None:
    # arrange: one row carries a label the schema does not declare
    tenant = new_tenant(small_client)
    secret = "zz-undeclared-7731"

    # act
    response = _upload(
        small_client,
        tenant,
        "p.csv",
        _csv() + f"50,0.5,{secret}\n".encode(),
        epsilon=2.0,
        delta=1e-4,
        schema=SCHEMA,
    )

    # assert
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "schema.classes"
    assert secret not in response.text
    _nothing_stored(small_client, tenant, tmp_path / "data")


@pytest.mark.parametrize(
    "schema",
    [None, "not json", '{"classes": ["sick"]}', '{"classes": ["sick", "well"], "x": 1}'],
    ids=["missing", "json", "one-class", "extra-key"],
)
def test_budgeted_upload_needs_a_valid_schema(
    small_client: TestClient, tmp_path: Path, schema: str | None
) -> None:
    # arrange
    tenant = new_tenant(small_client)
    fields: dict[str, Any] = {"epsilon": 2.0, "delta": 1e-4}
    if schema is not None:
        fields["schema"] = schema

    # act
    response = _upload(small_client, tenant, "p.csv", _csv(), **fields)

    # assert
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "schema"
    _nothing_stored(small_client, tenant, tmp_path / "data")


def test_public_upload_may_omit_the_schema(small_client: TestClient) -> None:
    tenant = new_tenant(small_client)

    response = _upload(small_client, tenant, "p.csv", _csv())

    assert response.status_code == 201, response.text
    assert response.json()["schema"] == {"classes": ["sick", "well"]}


# --------------------------------------------------------------------- δ over every unit


def test_delta_counts_held_out_records_too(small_client: TestClient) -> None:
    # arrange: 200 rows; δ = 0.0055 is below 1/n_train (about 1/160) but not below 1/200
    tenant = new_tenant(small_client)

    # act
    refused = _upload(
        small_client, tenant, "p.csv", _csv(), epsilon=2.0, delta=0.0055, schema=SCHEMA
    )
    accepted = _upload(
        small_client, tenant, "p.csv", _csv(), epsilon=2.0, delta=0.0049, schema=SCHEMA
    )

    # assert
    assert refused.status_code == 422 and refused.json()["field"] == "privacy_budget.delta"
    assert "n = 200" in refused.json()["detail"] and "held-out records" in refused.json()["detail"]
    assert accepted.status_code == 201, accepted.text


def _client_npz(num_clients: int, rows_per_client: int = 5) -> bytes:
    rng = np.random.default_rng(2)
    n = num_clients * rows_per_client
    buffer = io.BytesIO()
    np.savez(
        buffer, x=rng.random((n, 3)), y=rng.integers(0, 2, n), clients=np.arange(n) % num_clients
    )
    return buffer.getvalue()


def test_client_unit_counts_held_out_clients_in_delta_and_releases_both_counts(
    small_client: TestClient,
) -> None:
    # arrange: 60 natural clients; δ = 0.018 is below 1/(train clients ~ 48), not below 1/60
    tenant = new_tenant(small_client)
    fields = {
        "client_column": "clients",
        "privacy_unit": "client",
        "epsilon": 4.0,
        "schema": json.dumps({"classes": ["0", "1"]}),
    }

    # act
    refused = _upload(small_client, tenant, "c.npz", _client_npz(60), delta=0.018, **fields)
    accepted = _upload(small_client, tenant, "c.npz", _client_npz(60), delta=1e-3, **fields)

    # assert
    assert refused.status_code == 422, refused.text
    assert "n = 60" in refused.json()["detail"] and "held-out clients" in refused.json()["detail"]
    assert accepted.status_code == 201, accepted.text
    body = accepted.json()
    assert body["num_clients"] + body["num_test_clients"] == 60
    assert body["num_train"] == 5 * body["num_clients"]
    assert body["num_test"] == 5 * body["num_test_clients"]


# --------------------------------------------------------------------- validation sets


def _csv_with(columns: int, classes: tuple[str, str] = ("sick", "well")) -> bytes:
    rng = np.random.default_rng(3)
    names = [f"f{j}" for j in range(columns)]
    lines = [",".join([*names, "label"])]
    for i in range(100):
        lines.append(",".join([*(f"{v:.3f}" for v in rng.random(columns)), classes[i % 2]]))
    return ("\n".join(lines) + "\n").encode()


def test_validation_dataset_must_be_public_alike_and_the_tenants(
    small_client: TestClient,
) -> None:
    # arrange: candidates of this tenant and of another
    tenant, other = new_tenant(small_client), new_tenant(small_client)
    budget = {"epsilon": 2.0, "delta": 1e-4, "schema": SCHEMA}

    def upload(headers: dict[str, str], content: bytes, **fields: Any) -> Any:
        response = _upload(small_client, headers, "v.csv", content, **fields)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    public = upload(tenant, _csv_with(2), schema=SCHEMA)
    private = upload(tenant, _csv_with(2), **budget)
    wider = upload(tenant, _csv_with(3), schema=SCHEMA)
    relabelled = upload(tenant, _csv_with(2), schema=json.dumps({"classes": ["well", "sick"]}))
    foreign = upload(other, _csv_with(2), schema=SCHEMA)

    # act
    def register(validation_id: str) -> Any:
        return _upload(
            small_client, tenant, "p.csv", _csv(), validation_dataset_id=validation_id, **budget
        )

    accepted = register(public)
    refused = {
        name: register(dataset_id)
        for name, dataset_id in {
            "budgeted": private,
            "features": wider,
            "classes": relabelled,
            "other tenant": foreign,
            "missing": "ds_nope",
        }.items()
    }

    # assert
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["validation_dataset_id"] == public
    for name, response in refused.items():
        assert response.status_code == 422, (name, response.text)
        assert response.json()["field"] == "validation_dataset_id", name
    listed = small_client.get("/v1/datasets", headers=tenant).json()["items"]
    assert len(listed) == 5  # the four candidates and the accepted one


def test_builtin_registration_takes_a_validation_dataset(small_client: TestClient) -> None:
    # arrange: public digits as the validation set of budgeted digits
    tenant = new_tenant(small_client)

    def register(**extra: Any) -> Any:
        body = {"name": "d", "source": {"builtin": "digits"}, **extra}
        return small_client.post("/v1/datasets", json=body, headers=tenant)

    public = register(privacy_budget=None).json()
    csv = _upload(small_client, tenant, "v.csv", _csv_with(2), schema=SCHEMA).json()
    budget = {"epsilon": 8.0, "delta": 1e-5}

    # act
    accepted = register(privacy_budget=budget, validation_dataset_id=public["id"])
    refused = register(privacy_budget=budget, validation_dataset_id=csv["id"])

    # assert
    assert public["classes"] == [str(i) for i in range(10)]
    assert public["schema"] == {"classes": public["classes"]}
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["validation_dataset_id"] == public["id"]
    assert refused.status_code == 422 and refused.json()["field"] == "validation_dataset_id"
