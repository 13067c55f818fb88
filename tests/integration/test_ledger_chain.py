"""The ledger is a hash chain, and its newest heads are signed outside the database.

An edited entry, a deleted newest entry, a restored older copy of the database and a
hand-edited head file are each detected: ``ppml db check`` fails naming the dataset, and
admission answers 409 without writing anything until an operator acknowledges with
``ppml db acknowledge-rollback`` (a real process, which records the event).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from alembic.migration import MigrationContext
from alembic.operations import Operations
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete, select, text, update

from api.app import create_app
from ppml.config import Settings
from ppml.db.models import LedgerAcknowledgement, LedgerEntry
from ppml.db.session import Database
from ppml.privacy.heads import HeadFile, flush_all
from ppml.privacy.rollback import check_chains
from tests.conftest import dp_job_spec, new_tenant, register_digits

PPML = str(Path(sys.executable).parent / "ppml")


def _ppml(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PPML_DATABASE_URL": settings.resolved_database_url,
        "PPML_DATA_DIR": str(settings.data_dir),
    }
    return subprocess.run([PPML, "db", *args], env=env, capture_output=True, text=True)


def _submit(client: TestClient, headers: dict[str, str], dataset_id: str) -> Any:
    return client.post("/v1/jobs", json=dp_job_spec(dataset_id, epsilon=1.0), headers=headers)


def _entries(database: Database, dataset_id: str) -> list[tuple[int, str]]:
    with database.session() as session:
        rows = session.execute(
            select(LedgerEntry.seq, LedgerEntry.entry_hash)
            .where(LedgerEntry.dataset_id == dataset_id)
            .order_by(LedgerEntry.seq)
        )
        return [(int(seq), str(digest)) for seq, digest in rows]


def _acknowledgements(database: Database, dataset_id: str) -> list[LedgerAcknowledgement]:
    with database.session() as session:
        stmt = select(LedgerAcknowledgement).where(LedgerAcknowledgement.dataset_id == dataset_id)
        return list(session.scalars(stmt))


def _assert_rollback_refused(client: TestClient, headers: dict[str, str], dataset_id: str) -> None:
    budget = client.get(f"/v1/datasets/{dataset_id}/budget", headers=headers).json()
    refused = _submit(client, headers, dataset_id)
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"].endswith("/ledger-rollback")
    assert refused.json()["dataset_id"] == dataset_id
    # nothing was reserved: the budget is as it was
    assert client.get(f"/v1/datasets/{dataset_id}/budget", headers=headers).json() == budget


def test_entries_chain_per_dataset_and_the_head_file_follows(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings
) -> None:
    # arrange / act: two jobs, the first cancelled (a RELEASE appended by another path)
    dataset_id = register_digits(client, tenant)
    jobs = [_submit(client, tenant, dataset_id).json()["id"] for _ in range(2)]
    assert client.post(f"/v1/jobs/{jobs[0]}/cancel", headers=tenant).status_code == 202
    # assert: seq 1, 2, 3, each linked to the one before; the signed file holds the head
    entries = _entries(database, dataset_id)
    assert [seq for seq, _ in entries] == [1, 2, 3]
    assert flush_all()  # commits hand their heads to a writer thread
    heads = HeadFile.of(settings).read()
    assert heads[dataset_id].seq == 3 and heads[dataset_id].entry_hash == entries[-1][1]
    ledger = client.get(f"/v1/datasets/{dataset_id}/ledger", headers=tenant).json()["items"]
    assert [e["prev_hash"] for e in ledger[1:]] == [e["entry_hash"] for e in ledger[:-1]]
    assert check_chains(database, HeadFile.of(settings)).ok


def test_the_ledger_lists_in_chain_order_page_by_page_whatever_the_ids(
    client: TestClient, tenant: dict[str, str], database: Database
) -> None:
    # arrange: five entries; the first one's id made to sort last (ids made in the same
    # millisecond, as a settlement's commit and release are, sort at random)
    dataset_id = register_digits(client, tenant)
    jobs = [_submit(client, tenant, dataset_id).json()["id"] for _ in range(3)]
    for job_id in jobs[:2]:
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant).status_code == 202
    with database.session(write=True) as session:
        session.execute(
            update(LedgerEntry)
            .where(LedgerEntry.dataset_id == dataset_id, LedgerEntry.seq == 1)
            .values(id="led_zzzzzzzzzzzzzzzzzzzzzzzzzzzz")
        )
    # act: two entries a page
    url, pages, token = f"/v1/datasets/{dataset_id}/ledger", [], None
    while True:
        params: dict[str, Any] = {"page_size": 2, **({"page_token": token} if token else {})}
        page = client.get(url, params=params, headers=tenant).json()
        pages.append([e["seq"] for e in page["items"]])
        token = page["next_page_token"]
        if token is None:
            break
    bad = client.get(url, params={"page_token": "led_0123"}, headers=tenant)
    # assert: oldest first by the chain, each entry once; a foreign token is a 422
    assert pages == [[1, 2], [3, 4], [5]]
    assert bad.status_code == 422 and bad.json()["field"] == "page_token"


def test_an_edited_entry_is_found_by_db_check(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings
) -> None:
    # arrange: two reservations, then the first one's ε is lowered behind the ledger's back
    dataset_id = register_digits(client, tenant)
    for _ in range(2):
        assert _submit(client, tenant, dataset_id).status_code == 202
    with database.session(write=True) as session:
        session.execute(
            update(LedgerEntry)
            .where(LedgerEntry.dataset_id == dataset_id, LedgerEntry.seq == 1)
            .values(epsilon=0.001)
        )
    # act: both at once (the repair finds no cache to rebuild, so they do not interfere)
    with ThreadPoolExecutor(2) as pool:
        checking = pool.submit(_ppml, settings, "check")
        repaired = _ppml(settings, "check", "--repair")
        checked = checking.result()
    # assert: named, with the entry; --repair does not hide it
    assert checked.returncode == 1, checked.stderr
    assert dataset_id in checked.stderr and "entry 1" in checked.stderr
    assert "edited" in checked.stderr
    assert repaired.returncode == 1 and dataset_id in repaired.stderr
    assert "not repaired" in repaired.stderr


def test_a_deleted_newest_entry_refuses_admission_until_acknowledged(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings
) -> None:
    # arrange: two reservations; the newest entry is deleted
    dataset_id = register_digits(client, tenant)
    first = _submit(client, tenant, dataset_id).json()["id"]
    assert _submit(client, tenant, dataset_id).status_code == 202
    # A rollback (a restored backup) comes after the head was written; the writer thread
    # may still hold it for a moment after the commit.
    assert flush_all()
    with database.session(write=True) as session:
        session.execute(
            delete(LedgerEntry).where(LedgerEntry.dataset_id == dataset_id, LedgerEntry.seq == 2)
        )
    # act / assert: refused, and a worker's settlement on the cut chain (the cancel's
    # RELEASE becomes a new entry 2) does not move the signed head: still refused
    _assert_rollback_refused(client, tenant, dataset_id)
    assert client.post(f"/v1/jobs/{first}/cancel", headers=tenant).status_code == 202
    _assert_rollback_refused(client, tenant, dataset_id)
    report = check_chains(database, HeadFile.of(settings))
    assert list(report.behind) == [dataset_id] and not report.breaks
    # act: the operator acknowledges
    acknowledged = _ppml(settings, "acknowledge-rollback", dataset_id, "--note", "test")
    # assert
    assert acknowledged.returncode == 0, acknowledged.stderr
    [row] = _acknowledgements(database, dataset_id)
    assert (row.from_seq, row.to_seq, row.note) == (2, 2, "test")
    assert row.to_head == _entries(database, dataset_id)[-1][1] != row.from_head
    assert _submit(client, tenant, dataset_id).status_code == 202


@contextmanager
def _app(settings: Settings) -> Iterator[TestClient]:
    """An API on its own engine, closed (every connection) when the block ends."""
    with TestClient(create_app(settings, Database(settings.resolved_database_url))) as client:
        yield client


def _snapshot(settings: Settings, pg_admin: Engine | None) -> Callable[[], None]:
    """Copy the (closed) database now; the returned function restores that copy over it."""
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        live = Path(url.removeprefix("sqlite:///"))
        copy = live.with_name("backup.db")

        def sqlite_copy(source: Path, target: Path) -> None:
            with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
                src.backup(dst)

        sqlite_copy(live, copy)
        return lambda: sqlite_copy(copy, live)
    assert pg_admin is not None
    name = url.rsplit("/", 1)[1]
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}_backup" TEMPLATE "{name}"'))

    def swap() -> None:
        with pg_admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" RENAME TO "{name}_newer"'))
            conn.execute(text(f'ALTER DATABASE "{name}_backup" RENAME TO "{name}"'))
            conn.execute(text(f'DROP DATABASE "{name}_newer" WITH (FORCE)'))

    return swap


def test_a_restored_older_database_is_refused_not_refunded(
    settings: Settings, database: Database, request: Any
) -> None:
    pg_admin = None
    if not settings.resolved_database_url.startswith("sqlite"):
        pg_admin = request.getfixturevalue("pg_admin")
    database.dispose()
    # arrange: one job, a backup, a second job, then the backup is restored
    with _app(settings) as client:
        tenant = new_tenant(client)
        dataset_id = register_digits(client, tenant)
        assert _submit(client, tenant, dataset_id).status_code == 202
    restore = _snapshot(settings, pg_admin)
    with _app(settings) as client:
        assert _submit(client, tenant, dataset_id).status_code == 202
        spent = client.get(f"/v1/datasets/{dataset_id}/budget", headers=tenant).json()
    restore()
    # act / assert: the restored ledger (one reservation fewer) admits nothing
    with _app(settings) as client:
        restored = client.get(f"/v1/datasets/{dataset_id}/budget", headers=tenant).json()
        assert restored["epsilon_remaining"] > spent["epsilon_remaining"]
        _assert_rollback_refused(client, tenant, dataset_id)
        checked = check_chains(database, HeadFile.of(settings))
        assert dataset_id in checked.behind and not checked.ok
        acknowledged = _ppml(settings, "acknowledge-rollback", dataset_id, "--note", "restore")
        assert acknowledged.returncode == 0, acknowledged.stderr
        assert _submit(client, tenant, dataset_id).status_code == 202
    [row] = _acknowledgements(database, dataset_id)
    assert (row.from_seq, row.to_seq, row.note) == (2, 1, "restore")


def test_a_hand_edited_head_file_refuses_every_admission(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings
) -> None:
    # arrange: a ledger entry, a second dataset, then the head file is edited by hand
    dataset_id = register_digits(client, tenant)
    assert _submit(client, tenant, dataset_id).status_code == 202
    other = new_tenant(client)
    other_id = register_digits(client, other)
    path = settings.ledger_heads_path
    document = json.loads(path.read_text())
    document["heads"][dataset_id]["seq"] = 0  # "forget" the spending
    path.write_text(json.dumps(document))
    # act / assert: every dataset refuses, and the check says why
    for headers, target in ((tenant, dataset_id), (other, other_id)):
        refused = _submit(client, headers, target)
        assert refused.status_code == 409, refused.text
        assert refused.json()["type"].endswith("/ledger-heads-invalid")
    assert check_chains(database, HeadFile.of(settings)).head_file_invalid is not None
    # the operator rebuilds the file from the database (the invalid one is kept aside)
    rebuilt = _ppml(settings, "acknowledge-rollback", "--all", "--note", "edited file")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert list(path.parent.glob(f"{path.name}.invalid-*"))
    assert len(_acknowledgements(database, dataset_id)) == 1
    assert _submit(client, other, other_id).status_code == 202


def _migration() -> Any:
    path = next(Path(__file__).parents[2].glob("migrations/versions/*-a7e6f8b9c0d1_*.py"))
    spec = importlib.util.spec_from_file_location("ledger_chain_migration", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_migration_chains_existing_entries_as_the_ledger_does(
    client: TestClient, tenant: dict[str, str], database: Database
) -> None:
    # arrange: entries written by the ledger, then their chain columns scrambled
    dataset_id = register_digits(client, tenant)
    job = _submit(client, tenant, dataset_id).json()["id"]
    assert client.post(f"/v1/jobs/{job}/cancel", headers=tenant).status_code == 202
    appended = _entries(database, dataset_id)
    with database.session(write=True) as session:
        session.execute(
            update(LedgerEntry).values(seq=LedgerEntry.seq + 100, prev_hash="x", entry_hash="y")
        )
    # act: the migration's backfill, on the same rows
    with database.engine.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        _migration()._chain_existing_entries()
    # assert: the same chain, hash for hash
    assert _entries(database, dataset_id) == appended
