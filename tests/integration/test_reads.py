"""ppml.db.reads: the API's thread-free job read gives what the ORM read gives."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from ppml.config import Settings
from ppml.db import models
from ppml.db.reads import APPLICATION_NAME, AsyncReads
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.services import audit
from ppml.services.admissions import Admission
from ppml.services.pricing import price
from ppml.services.tenants import Principal
from ppml.specs import request_hash
from tests.conftest import (
    PG_ADMIN_URL,
    dp_job_spec,
    new_tenant,
    new_tenant_id,
    register_digits,
)
from tests.unit.worlds import job_spec as world_job_spec
from tests.unit.worlds import make_service_world


def _columns(job: models.Job | None) -> dict[str, Any] | None:
    if job is None:
        return None
    return {column.key: getattr(job, column.key) for column in models.Job.__table__.columns}


def _job_with_every_column_set(
    client: TestClient, database: Database, headers: dict[str, str] | None = None
) -> tuple[str, str]:
    headers = headers or new_tenant(client)
    dataset_id = register_digits(client, headers)
    created = client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=headers)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    now = datetime.now(UTC)
    with database.session(write=True) as session:
        job = Repositories(session).job_by_id(job_id, lock=True)
        assert job is not None
        job.status = models.JobStatus.RUNNING
        job.progress = {"fraction": 0.25, "epoch": 1, "round": None, "steps": 7}
        release = {
            "mechanism": "gaussian",
            "scored_on": "test",
            "validation_dataset_id": None,
            "units": 360,
            "noise_multiplier": 9.0,
            "loss_clip": 4.0,
            "accuracy_noise_std": 0.025,
            "loss_noise_std": 0.1,
        }
        metrics = {"test_accuracy": 0.5, "test_loss": 1.0, "round": None, "release": release}
        job.metrics = metrics
        job.metrics_history = [{**metrics, "round": r} for r in (1, 2)]
        job.exact_metrics = {"metrics": {"test_accuracy": 0.51, "test_loss": 1.1}, "history": None}
        job.error = {"code": "none", "message": "ünïcode"}
        job.lease_owner = "worker-1"
        job.lease_expires_at = now + timedelta(seconds=30)
        job.heartbeat_at = job.started_at = now
        job.finished_at = now + timedelta(seconds=1)
        job.artifacts = {"safetensors": {"key": "k", "sha256": "0" * 64}}
        job.attempts = 2
        tenant_id = job.tenant_id
    return tenant_id, job_id


async def _read(reads: AsyncReads, *keys: tuple[str, str]) -> list[models.Job | None]:
    await reads.open()
    try:
        return [await reads.job(tenant_id, job_id) for tenant_id, job_id in keys]
    finally:
        await reads.close()


def test_the_async_read_returns_the_orm_row(client: TestClient, database: Database) -> None:
    """Every column, JSON and UTC datetimes included; another tenant or id reads nothing."""
    tenant_id, job_id = _job_with_every_column_set(client, database)
    with database.read_one() as session:
        expected = _columns(Repositories(session).job(tenant_id, job_id))
    assert expected is not None and expected["finished_at"].tzinfo is not None
    reads = AsyncReads(database)
    found, other_tenant, unknown = asyncio.run(
        _read(reads, (tenant_id, job_id), ("ten_other", job_id), (tenant_id, "job_unknown"))
    )
    assert _columns(found) == expected
    assert other_tenant is None and unknown is None


def test_jobs_admitted_together_read_as_the_orm_reads_them(
    database: Database, settings: Settings
) -> None:
    """A batch's bulk insert leaves the JSON columns never set SQL NULL (the ORM's insert of
    one job writes JSON null): both read as None, on the pool's path too."""
    world = make_service_world(database, settings)
    dataset = world.digits(epsilon=100.0)
    job_spec = world_job_spec(dataset.id, epsilon=0.5)
    admission = Admission(
        tenant_id=world.tenant_id,
        dataset=dataset,
        spec=job_spec,
        pricing=price(job_spec, dataset, world.settings),
    )
    decided = world.service._decide(dataset.id, [(admission, request_hash(job_spec))] * 2)[0]
    world.sent()  # leave nothing in the process-wide memory broker
    jobs = [job for job in decided if isinstance(job, models.Job)]
    assert len(jobs) == 2
    with database.read_one() as session:
        expected = [_columns(Repositories(session).job(world.tenant_id, j.id)) for j in jobs]
    assert all(e is not None and e["metrics"] is None and e["receipt"] is None for e in expected)

    found = asyncio.run(_read(AsyncReads(database), *((world.tenant_id, j.id) for j in jobs)))

    assert [_columns(job) for job in found] == expected


def test_reads_run_on_the_event_loop_only_on_postgres(
    database: Database, database_url: str
) -> None:
    reads = AsyncReads(database)

    async def opened() -> bool:
        await reads.open()
        try:
            return reads.asynchronous
        finally:
            await reads.close()

    assert asyncio.run(opened()) is (not database_url.startswith("sqlite"))
    assert not reads.asynchronous  # closed: reads take the thread path again


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_read_survives_the_server_dropping_every_pool_connection(
    client: TestClient, database: Database
) -> None:
    headers = new_tenant(client)
    tenant_id, job_id = _job_with_every_column_set(client, database, headers)
    reads = AsyncReads(database, size=3)

    async def scenario() -> tuple[int, models.Job | None]:
        await reads.open()
        try:
            await reads.job(tenant_id, job_id)
            with database.engine.connect() as conn:
                killed = conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = :name AND datname = current_database()"
                    ),
                    {"name": APPLICATION_NAME},
                ).scalar_one()
            return killed, await reads.job(tenant_id, job_id)
        finally:
            await reads.close()

    killed, job = asyncio.run(scenario())
    assert killed >= 3  # ours, and the app's own pool (the client fixture's lifespan)
    assert job is not None and job.id == job_id
    # The app's pool lost its connections too: its next poll still answers.
    polled = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert polled.status_code == 200, polled.text
    assert polled.json()["attempts"] == 2


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_database_outage_answers_503_changes_nothing_and_passes(
    client: TestClient, database: Database, database_url: str
) -> None:
    """PostgreSQL refusing connections (as while it restarts): polls (the async read), pages
    and dataset reads (the ORM), and submits answer 503 problem+json with Retry-After, and
    the same app serves again once the database is back."""
    headers = new_tenant(client)
    dataset_id = register_digits(client, headers)
    job_id = client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=headers).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 200  # key cached
    name = make_url(database_url).database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
        refused = [
            client.get(f"/v1/jobs/{job_id}", headers=headers),
            client.get("/v1/jobs", headers=headers),
            client.get(f"/v1/datasets/{dataset_id}", headers=headers),
            client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=headers),
        ]
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    for response in refused:
        assert response.status_code == 503, (response.request.url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "2"
        assert response.json()["type"] == "/problems/service-unavailable"
    polled = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert polled.status_code == 200, polled.text
    page = client.get("/v1/jobs", headers=headers).json()
    assert [job["id"] for job in page["items"]] == [job_id]  # the refused submit left nothing


def _audit_row(tenant_id: str, n: int) -> dict[str, Any]:
    by = Principal(tenant_id=tenant_id, key_id=f"key_{n}", role="analyst")
    return audit.fields_of(by, "model.download", "job", f"job_{n}", {"format": "onnx"})


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_concurrent_audit_rows_share_inserts_and_each_caller_waits_for_its_commit(
    client: TestClient, database: Database
) -> None:
    """Rows appended while an insert is under way go together in one statement; each caller
    returns once its row is committed (another connection reads it at once), or with the
    statement's error."""
    tenant_id = new_tenant_id(client)
    reads = AsyncReads(database)
    statements: list[int] = []
    insert = reads._insert_audits

    async def counted(pool: Any, batch: Sequence[Mapping[str, Any]]) -> None:
        statements.append(len(batch))
        await insert(pool, batch)

    reads._insert_audits = counted  # type: ignore[method-assign]
    rows = [_audit_row(tenant_id, n) for n in range(12)]

    def committed() -> set[str]:
        with database.read_one() as session:
            column = models.AuditEvent.id
            return set(session.scalars(select(column).where(column.in_([r["id"] for r in rows]))))

    async def append(row: dict[str, Any]) -> set[str]:
        await reads.append_audit(row)
        return await asyncio.to_thread(committed)

    async def scenario() -> list[Any]:
        await reads.open()
        try:
            return await asyncio.gather(*(append(row) for row in rows))
        finally:
            await reads.close()

    seen = asyncio.run(scenario())

    assert sum(statements) == 12 and len(statements) < 12
    assert all(row["id"] in found for row, found in zip(rows, seen, strict=True))

    async def broken(pool: Any, batch: Sequence[Mapping[str, Any]]) -> None:
        await asyncio.sleep(0)
        raise psycopg.OperationalError("gone")

    reads._insert_audits = broken  # type: ignore[method-assign]

    async def failing() -> list[Any]:
        await reads.open()
        try:
            appends = (reads.append_audit(_audit_row(tenant_id, n)) for n in range(12, 15))
            return await asyncio.gather(*appends, return_exceptions=True)
        finally:
            await reads.close()

    assert [type(e) for e in asyncio.run(failing())] == [psycopg.OperationalError] * 3
