"""The cached budget totals are checked against the fold of the ledger at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import update

from ppml.db.models import DatasetBudget
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.privacy.ledger import Ledger
from tests.conftest import dp_job_spec, register_digits

PPML = str(Path(sys.executable).parent / "ppml")


def _ppml_db_check(
    database_url: str, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PPML_DATABASE_URL": database_url, "PPML_DATA_DIR": str(tmp_path)}
    return subprocess.run([PPML, "db", "check", *args], env=env, capture_output=True, text=True)


def test_a_tampered_cache_is_detected_and_rebuilt_from_the_entries(
    client: TestClient,
    tenant: dict[str, str],
    database: Database,
    database_url: str,
    tmp_path: Path,
) -> None:
    # arrange: two reservations, then the cached totals are corrupted behind the ledger's back
    dataset_id = register_digits(client, tenant)
    for epsilon in (1.0, 2.0):
        assert (
            client.post(
                "/v1/jobs", json=dp_job_spec(dataset_id, epsilon=epsilon), headers=tenant
            ).status_code
            == 202
        )
    assert _ppml_db_check(database_url, tmp_path).returncode == 0
    with database.session(write=True) as session:
        session.execute(
            update(DatasetBudget)
            .where(DatasetBudget.dataset_id == dataset_id)
            .values(reserved={"grid": "rdp-v1", "units": [0] * 20})
        )
    # act
    detected = _ppml_db_check(database_url, tmp_path)
    repaired = _ppml_db_check(database_url, tmp_path, "--repair")
    # assert
    assert detected.returncode == 1 and dataset_id in detected.stderr
    assert repaired.returncode == 0
    with database.session() as session:
        ledger = Ledger(Repositories(session))
        budget = ledger.repos.budget(dataset_id)
        assert budget is not None
        committed, reserved = ledger.fold(dataset_id)
        assert tuple(budget.reserved["units"]) == reserved and any(reserved)
        assert tuple(budget.committed["units"]) == committed
    assert _ppml_db_check(database_url, tmp_path).returncode == 0
