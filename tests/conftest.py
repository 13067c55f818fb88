"""Shared fixtures: real databases built by the migrations, apps, tenants, service processes."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text

from api.app import create_app
from ppml.config import Settings
from ppml.db.migrate import upgrade
from ppml.db.session import Database

if TYPE_CHECKING:
    from tests.integration.s3_helpers import S3Server

PG_ADMIN_URL = os.environ.get(
    "PPML_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PPML_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "test-admin-token-0123456789"


def _pg_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


# Databases: the migrations run once per session, into a template; each test gets a copy.
# PostgreSQL clones the template (CREATE DATABASE … TEMPLATE, a file copy), SQLite copies the
# file. No test runs inside a transaction rolled back at its end: the app, the services and
# the workers open their own sessions (the API's job reads their own psycopg connections), on
# threads and in processes, so no one connection could hold what a test writes. A copy
# isolates every kind of test alike, for about the cost of an empty database.


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """An autocommit engine on the server's maintenance database (CREATE/DROP DATABASE)."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield admin
    admin.dispose()


@contextmanager
def _pg_database(admin: Engine, *, template: str | None) -> Iterator[str]:
    """A new database (a copy of ``template`` if given, else empty), dropped afterwards."""
    name = f"ppml_test_{secrets.token_hex(6)}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"{copy}'))
    try:
        yield _pg_url(name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_template(pg_admin: Engine) -> Iterator[str]:
    """Name of a PostgreSQL database built by the migrations once per session, for cloning.

    Unique per pytest process, so concurrent runs on one server do not share it.
    """
    name = f"ppml_template_{os.getpid()}_{secrets.token_hex(4)}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        upgrade(_pg_url(name))  # its engine has no pool: nothing stays connected
        with pg_admin.connect() as conn:
            # PostgreSQL refuses to copy a database that has a session open; none can open.
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        yield name
    finally:
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file built by the migrations once per session, for copying."""
    path = tmp_path_factory.mktemp("template") / "ppml.db"
    upgrade(f"sqlite:///{path}")  # rollback-journal mode, closed: the one file is the database
    return path


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) for the session, checking signed requests; each test
    takes its own bucket (``s3.new_bucket()``). Fails, never skips, without the binary."""
    from tests.integration.s3_helpers import s3_server  # boto3: only for tests that use it

    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def pg_database_url(pg_admin: Engine, pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database (a clone of the template), dropped afterwards."""
    with _pg_database(pg_admin, template=pg_template) as url:
        yield url


@pytest.fixture
def sqlite_database_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A fresh, migrated SQLite database (a copy of the template) in the test's directory."""
    path = tmp_path / "ppml.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database: each test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_database_url"))
    return str(request.getfixturevalue("pg_database_url"))


@pytest.fixture
def empty_pg_database_url(pg_admin: Engine) -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    with _pg_database(pg_admin, template=None) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database, on SQLite and on PostgreSQL, for tests that run migrations."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return str(request.getfixturevalue("empty_pg_database_url"))


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """A database whose schema was built by the Alembic migrations (a copy of the template)."""
    db = Database(database_url)
    yield db
    db.dispose()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        # Nothing listens here: tests of the API alone must not reach a real queue.
        broker_url="memory://",
        admin_token=ADMIN_TOKEN,
    )


@pytest.fixture
def client(settings: Settings, database: Database) -> Iterator[TestClient]:
    app = create_app(settings, database)
    with TestClient(app) as test_client:
        yield test_client


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def new_key(client: Any, tenant_id: str, role: str | None = None) -> dict[str, str]:
    """A new key of the tenant (no body: an owner's); returns its auth headers."""
    body = None if role is None else {"role": role}
    key = client.post(f"/v1/tenants/{tenant_id}/api-keys", json=body, headers=admin_headers())
    assert key.status_code == 201, key.text
    assert key.json()["role"] == (role or "owner")
    return {"Authorization": f"Bearer {key.json()['key']}"}


def new_tenant_id(client: Any, name: str | None = None) -> str:
    name = name or f"t{secrets.token_hex(4)}"
    tenant = client.post("/v1/tenants", json={"name": name}, headers=admin_headers())
    assert tenant.status_code == 201, tenant.text
    return str(tenant.json()["id"])


def new_tenant(client: Any, name: str | None = None, *, role: str | None = None) -> dict[str, str]:
    """Create a tenant and a key (an owner's unless ``role``); returns its auth headers."""
    return new_key(client, new_tenant_id(client, name), role)


@pytest.fixture
def tenant(client: TestClient) -> dict[str, str]:
    return new_tenant(client)


@pytest.fixture
def owner_and_analyst(client: TestClient) -> tuple[dict[str, str], dict[str, str]]:
    """Auth headers of an owner key and an analyst key of one tenant."""
    tenant_id = new_tenant_id(client)
    return new_key(client, tenant_id, "owner"), new_key(client, tenant_id, "analyst")


def register_digits(
    client: Any, headers: dict[str, str], *, epsilon: float | None = 8.0, delta: float = 1e-5
) -> str:
    budget = None if epsilon is None else {"epsilon": epsilon, "delta": delta}
    body = {"name": "digits", "source": {"builtin": "digits"}, "privacy_budget": budget}
    response = client.post("/v1/datasets", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def dp_job_spec(dataset_id: str, *, epsilon: float = 3.0, epochs: int = 30) -> dict[str, Any]:
    return {
        "name": "digits-dp",
        "dataset_id": dataset_id,
        "model": {"arch": "mlp", "hidden_sizes": [128]},
        "training": {"epochs": epochs, "batch_size": 128, "learning_rate": 0.5, "seed": 0},
        "privacy": {"target_epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0},
        "federated": None,
    }
