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
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ppml.config import Limits, Settings
from ppml.db.models import utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.jobs.reaper import Reaper
from ppml.queue import make_celery
from tests.conftest import ADMIN_TOKEN, new_key, new_tenant, new_tenant_id
from tests.integration.ingest_helpers import ingest_in, upload
from tests.integration.stack import BIN, free_port, process, service_env, wait_ready
from tests.security.bombs import csv_bomb, npz_bomb, parquet_bomb

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
    """Upload, and ingest what was accepted: the answer shows the dataset ready or invalid."""
    data = {"name": "upload", "target": "label", **{k: str(v) for k, v in fields.items()}}
    return upload(client, headers, data=data, files={"file": (name, content)})


def _refused(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """The problem of an upload refused at once, or the reason of one that ended invalid."""
    if response.status_code == 202:
        assert response.json()["status"] == "invalid", response.text
        problem: dict[str, Any] = response.json()["problem"]
        assert problem["type"].startswith("/problems/") and problem["detail"]
        return problem
    assert response.status_code == (status or response.status_code), response.text
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    return body


def _nothing_stored(client: TestClient, headers: dict[str, str], data_dir: Path) -> None:
    """Of a refused upload nothing is kept but an invalid dataset's reason."""
    for item in client.get("/v1/datasets", headers=headers).json()["items"]:
        assert item["status"] == "invalid" and item["problem"] is not None
        assert item["num_train"] is None
    kept = {".npz", ".upload", ".csv", ".parquet", ".pq"}
    leftovers = [p for p in data_dir.rglob("*") if p.is_file() and p.suffix in kept]
    assert leftovers == []


SCHEMA = json.dumps({"classes": ["sick", "well"]})


def test_csv_upload_with_budget_registers_a_dataset(small_client: TestClient) -> None:
    tenant = new_tenant(small_client)
    response = _upload(
        small_client, tenant, "p.csv", _csv(), epsilon=2.0, delta=1e-4, schema=SCHEMA
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["num_features"] == 2 and body["num_classes"] == 2
    assert body["classes"] == ["sick", "well"] and body["schema"] == {
        "classes": ["sick", "well"],
        "input_shape": None,
        "bounds": None,
    }
    assert body["num_train"] + body["num_test"] == 200 and body["num_test"] > 0
    assert body["privacy_budget"] == {"epsilon": 2.0, "delta": 1e-4}
    assert response.headers["location"] == f"/v1/datasets/{body['id']}"


def test_npz_upload_with_client_column(small_client: TestClient) -> None:
    tenant = new_tenant(small_client)
    buffer = io.BytesIO()
    rng = np.random.default_rng(1)
    np.savez(buffer, x=rng.random((300, 4)), y=rng.integers(0, 3, 300), clients=np.arange(300) % 5)
    response = _upload(small_client, tenant, "d.npz", buffer.getvalue(), client_column="clients")
    assert response.status_code == 202, response.text
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
    # assert: refused at once, or (a bad value deep in the file) invalid once validated
    _refused(response)
    if case != "non_numeric":
        assert response.status_code != 202, response.text
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
    assert response.status_code == 202, response.text
    for body in (response.json(), shown.json()):
        assert body["classes"] == declared
        assert body["schema"] == {"classes": declared, "input_shape": None, "bounds": None}
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

    # assert: found by the worker; the reason names the field, never the value
    assert _refused(response)["field"] == "schema.classes"
    assert secret not in response.text
    _nothing_stored(small_client, tenant, tmp_path / "data")


def test_why_a_budgeted_upload_is_invalid_is_shown_to_owners_only(
    small_client: TestClient,
) -> None:
    # arrange: the reason is learnt from protected rows (here: an undeclared label)
    tenant_id = new_tenant_id(small_client)
    owner, analyst = new_key(small_client, tenant_id), new_key(small_client, tenant_id, "analyst")
    bad = _csv() + b"50,0.5,undeclared\n"
    dataset_id = _upload(
        small_client, owner, "p.csv", bad, epsilon=2.0, delta=1e-4, schema=SCHEMA
    ).json()["id"]
    # act
    seen_by_owner = small_client.get(f"/v1/datasets/{dataset_id}", headers=owner).json()
    seen_by_analyst = small_client.get(f"/v1/datasets/{dataset_id}", headers=analyst).json()
    listed = small_client.get("/v1/datasets", headers=analyst).json()["items"]
    # assert
    assert seen_by_owner["status"] == seen_by_analyst["status"] == "invalid"
    assert seen_by_owner["problem"]["field"] == "schema.classes"
    assert seen_by_analyst["problem"] is None
    assert [item["problem"] for item in listed] == [None]


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

    assert response.status_code == 202, response.text
    assert response.json()["schema"] == {
        "classes": ["sick", "well"],
        "input_shape": None,
        "bounds": None,
    }


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
    problem = _refused(refused)
    assert problem["field"] == "privacy_budget.delta"
    assert "n = 200" in problem["detail"] and "held-out records" in problem["detail"]
    assert accepted.status_code == 202, accepted.text


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
    problem = _refused(refused)
    assert "n = 60" in problem["detail"] and "held-out clients" in problem["detail"]
    assert accepted.status_code == 202, accepted.text
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
        assert response.status_code == 202, response.text
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

    # assert: what needs no data is refused at once, the shape once the file is read
    assert accepted.status_code == 202 and accepted.json()["status"] == "ready", accepted.text
    assert accepted.json()["validation_dataset_id"] == public
    for name, response in refused.items():
        at_once = name not in ("features", "classes")
        assert (response.status_code == 422) is at_once, (name, response.text)
        assert _refused(response)["field"] == "validation_dataset_id", name
    listed = small_client.get("/v1/datasets", headers=tenant).json()["items"]
    statuses = sorted(d["status"] for d in listed)
    assert statuses == ["invalid"] * 2 + ["ready"] * 5  # candidates, accepted, 2 refused late


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
    assert public["schema"] == {
        "classes": public["classes"],
        "input_shape": [1, 8, 8],
        "bounds": None,
    }
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["validation_dataset_id"] == public["id"]
    assert refused.status_code == 422 and refused.json()["field"] == "validation_dataset_id"


# --------------------------------------------------------------------- input shape


def _images(*image: int, rows: int = 120, seed: int = 2) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    np.savez(buffer, x=rng.random((rows, *image)), y=np.arange(rows) % 2)
    return buffer.getvalue()


def test_npz_images_declare_their_shape_and_cnn2d_jobs_are_quoted_on_them(
    small_client: TestClient,
) -> None:
    # arrange
    tenant = new_tenant(small_client)
    budgeted = {"epsilon": 2.0, "delta": 1e-4}
    schema = json.dumps({"classes": ["0", "1"], "input_shape": [1, 6, 6]})

    # act: (n, C, H, W) and (n, H, W) arrays; a budgeted one declaring the shape it has
    color = _upload(small_client, tenant, "c.npz", _images(3, 4, 5))
    grey = _upload(small_client, tenant, "g.npz", _images(6, 6), schema=schema, **budgeted)
    flat = _upload(small_client, tenant, "f.npz", _images(36, seed=3), schema=schema, **budgeted)

    # assert
    assert color.json()["schema"]["input_shape"] == [3, 4, 5]
    assert color.json()["num_features"] == 60
    for response in (grey, flat):
        assert response.json()["status"] == "ready", response.text
        assert response.json()["schema"] == {
            "classes": ["0", "1"],
            "input_shape": [1, 6, 6],
            "bounds": None,
        }
    job = {
        "name": "cnn",
        "dataset_id": grey.json()["id"],
        "model": {"arch": "cnn2d", "channels": [4], "kernel_size": 3},
        "training": {"epochs": 1, "batch_size": 16, "learning_rate": 0.1},
        "privacy": {"target_epsilon": 1.0},
    }
    quote = small_client.post("/v1/jobs/quote", json=job, headers=tenant)
    assert quote.status_code == 200, quote.text


@pytest.mark.parametrize(
    ("name", "content", "input_shape"),
    [
        ("p.csv", _csv(), [1, 1, 3]),  # 2 feature columns
        ("g.npz", _images(6, 6), [1, 4, 9]),  # the images are 6 x 6
        ("f.npz", _images(36), [1, 6, 5]),
        ("f.npz", _images(36), [1, 6, -6]),
    ],
    ids=["csv-count", "npz-image-shape", "npz-count", "negative"],
)
def test_an_input_shape_that_does_not_fit_the_file_is_a_422_at_once(
    small_client: TestClient, tmp_path: Path, name: str, content: bytes, input_shape: list[int]
) -> None:
    # arrange
    tenant = new_tenant(small_client)
    schema = json.dumps({"classes": ["0", "1", "sick", "well"], "input_shape": input_shape})

    # act
    response = _upload(small_client, tenant, name, content, schema=schema)

    # assert
    assert _refused(response, 422)["field"] == "schema.input_shape"
    _nothing_stored(small_client, tenant, tmp_path / "data")


def test_cnn2d_on_data_without_an_image_shape_is_a_422_naming_the_field(
    small_client: TestClient,
) -> None:
    # arrange: breast_cancer declares no input shape; digits declare [1, 8, 8]
    tenant = new_tenant(small_client)

    def job_on(builtin: str) -> httpx.Response:
        body = {"name": builtin, "source": {"builtin": builtin}, "privacy_budget": None}
        dataset = small_client.post("/v1/datasets", json=body, headers=tenant).json()
        job = {
            "name": "cnn",
            "dataset_id": dataset["id"],
            "model": {"arch": "cnn2d"},
            "training": {"epochs": 1, "batch_size": 64, "learning_rate": 0.1},
            "privacy": None,
        }
        return small_client.post("/v1/jobs/quote", json=job, headers=tenant)

    # act
    refused, quoted = job_on("breast_cancer"), job_on("digits")

    # assert
    assert _refused(refused, 422)["field"] == "model.arch"
    assert "input_shape" in refused.json()["detail"]
    assert quoted.status_code == 200, quoted.text


# --------------------------------------------------------------------- ingestion


@pytest.mark.parametrize("bomb", ["parquet", "npz", "csv"])
def test_decompression_bombs_are_refused_at_once_by_their_decoded_size(
    small_client: TestClient, tmp_path: Path, bomb: str
) -> None:
    # arrange: under the 2 MB upload limit, decoding to 0.75 to 60 GB
    tenant = new_tenant(small_client)
    build = {"parquet": parquet_bomb, "npz": npz_bomb, "csv": csv_bomb}[bomb]
    path = build(tmp_path / f"bomb.{bomb}")
    # act
    started = time.monotonic()
    response = _upload(small_client, tenant, path.name, path.read_bytes())
    elapsed = time.monotonic() - started
    # assert
    problem = _refused(response, 413)
    assert problem["decoded_bytes"] > problem["limit"] == 512 * 1024**2
    assert elapsed < 1.0
    assert small_client.get("/v1/datasets", headers=tenant).json()["items"] == []
    _nothing_stored(small_client, tenant, tmp_path / "data")


def test_a_validating_dataset_refuses_jobs_until_it_is_ready(small_client: TestClient) -> None:
    # arrange: accepted, not yet ingested
    tenant = new_tenant(small_client)
    form = {"name": "p", "target": "label", "epsilon": "2", "delta": "1e-4", "schema": SCHEMA}
    accepted = small_client.post(
        "/v1/datasets/upload", headers=tenant, data=form, files={"file": ("p.csv", _csv())}
    )
    dataset_id = accepted.json()["id"]
    spec = {
        "name": "j",
        "dataset_id": dataset_id,
        "model": {"arch": "logreg"},
        "training": {"epochs": 1, "batch_size": 16, "learning_rate": 0.1},
        "privacy": {"target_epsilon": 1.0, "delta": 1e-5},
    }
    # act
    early = small_client.post("/v1/jobs", json=spec, headers=tenant)
    budget = small_client.get(f"/v1/datasets/{dataset_id}/budget", headers=tenant)
    outcomes = [ingest_in(small_client, dataset_id) for _ in range(2)]  # a duplicate delivery
    later = small_client.post("/v1/jobs", json=spec, headers=tenant)
    # assert
    assert accepted.status_code == 202 and accepted.json()["status"] == "validating"
    assert accepted.json()["classes"] == ["sick", "well"]  # declared, so known at once
    for refused in (early, budget):
        assert refused.status_code == 409, refused.text
        assert refused.json()["type"] == "/problems/dataset-not-ready"
    assert outcomes == ["ready", "ready"]
    assert later.status_code == 202, later.text
    ready = small_client.get(f"/v1/datasets/{dataset_id}/budget", headers=tenant)
    assert ready.json()["epsilon_total"] == 2.0


def test_storage_quota_counts_stored_uploads_and_frees_invalid_ones(
    tmp_path: Path, database: Database, database_url: str
) -> None:
    # arrange: a 1 MiB quota; uploads of about 600 KB
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url="memory://",
        admin_token=ADMIN_TOKEN,
        limits=Limits(max_upload_bytes=MAX_UPLOAD, max_tenant_storage_bytes=1024**2),
    )
    with TestClient(create_app(settings, database)) as client:
        tenant, other = new_tenant(client), new_tenant(client)
        good = _csv(rows=40_000)
        bad = good.replace(b"\n3", b"\nx", 1)  # a value only decoding finds

        # act
        first = client.post(
            "/v1/datasets/upload",
            headers=tenant,
            data={"name": "a", "target": "label"},
            files={"file": ("a.csv", bad)},
        )
        over = _upload(client, tenant, "b.csv", good)
        elsewhere = _upload(client, other, "b.csv", good)
        ingest_in(client, first.json()["id"])  # invalid: its bytes are freed
        after = _upload(client, tenant, "b.csv", good)

    # assert
    assert first.status_code == 202, first.text
    problem = _refused(over, 409)
    assert problem["type"] == "/problems/storage-quota-exceeded"
    assert problem["stored_bytes"] == len(bad) and problem["limit"] == 1024**2
    assert problem["upload_bytes"] == len(good)
    assert elsewhere.json()["status"] == "ready"
    assert after.json()["status"] == "ready", after.text


def test_an_upload_that_keeps_killing_its_worker_ends_invalid(
    small_client: TestClient, tmp_path: Path
) -> None:
    # arrange: the task was delivered max_attempts times already, each killing its worker
    tenant = new_tenant(small_client)
    accepted = small_client.post(
        "/v1/datasets/upload",
        headers=tenant,
        data={"name": "p", "target": "label"},
        files={"file": ("p.csv", _csv())},
    )
    dataset_id = accepted.json()["id"]
    state = small_client.app.state  # type: ignore[attr-defined]
    with state.db.session(write=True) as session:
        row = Repositories(session).lock_dataset(dataset_id)
        assert row is not None
        row.ingest_attempts = state.settings.worker.max_attempts
    # act
    outcome = ingest_in(small_client, dataset_id)
    # assert
    shown = small_client.get(f"/v1/datasets/{dataset_id}", headers=tenant).json()
    assert outcome == "invalid" and shown["problem"]["type"] == "/problems/ingestion-failed"
    assert "stopped its worker 3 times" in shown["problem"]["detail"]
    _nothing_stored(small_client, tenant, tmp_path / "data")


def test_the_reaper_resends_a_lost_ingestion_but_not_one_in_progress(
    small_client: TestClient,
) -> None:
    # arrange: two uploads whose messages were sent long ago; one is being validated
    tenant = new_tenant(small_client)
    state = small_client.app.state  # type: ignore[attr-defined]
    ids = [
        small_client.post(
            "/v1/datasets/upload",
            headers=tenant,
            data={"name": name, "target": "label"},
            files={"file": ("p.csv", _csv())},
        ).json()["id"]
        for name in ("lost", "running")
    ]
    long_ago = utcnow() - timedelta(hours=1)
    with state.db.session(write=True) as session:
        for dataset_id in ids:
            row = Repositories(session).lock_dataset(dataset_id)
            assert row is not None
            row.ingest_sent_at = long_ago
            row.ingest_started_at = utcnow() if dataset_id == ids[1] else None
    reaper = Reaper(state.db, state.settings, make_celery(state.settings))
    # act
    report = reaper.run_once()
    duplicate = ingest_in(small_client, ids[1])  # delivered while the attempt runs
    # assert
    assert report.resent_datasets == [ids[0]]
    assert duplicate == "validating"
    with state.db.session() as session:
        running = Repositories(session).dataset_by_id(ids[1])
        assert running is not None and running.ingest_attempts == 0
    assert reaper.run_once().resent_datasets == []  # sent again just now
