"""Issue #15, finding 7: the per-tenant cap on active jobs is exact under concurrent submits.

Two API apps (each with its own job service, caches and group commit, as two API processes
have) on one PostgreSQL database; 60 threads submit at once to two datasets of one tenant,
private jobs (grouped admissions) and non-private ones (single admissions) mixed. With a cap
of 5, exactly 5 are admitted and 55 refused with 429 and Retry-After.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ppml.config import Limits, Settings
from ppml.db.session import Database
from tests.conftest import ADMIN_TOKEN, dp_job_spec, new_tenant, register_digits

CAP, SUBMITS = 5, 60


@pytest.fixture
def clients(tmp_path: Path, pg_database_url: str) -> Iterator[list[TestClient]]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=pg_database_url,
        broker_url="memory://",
        admin_token=ADMIN_TOKEN,
        limits=Limits(max_active_jobs_per_tenant=CAP),
    )
    with ExitStack() as stack:
        apps = []
        for _ in range(2):
            db = Database(pg_database_url)
            stack.callback(db.dispose)
            apps.append(stack.enter_context(TestClient(create_app(settings, db))))
        yield apps


def test_sixty_concurrent_submits_admit_exactly_the_cap(clients: list[TestClient]) -> None:
    # arrange: a private and a public dataset of one tenant
    owner = new_tenant(clients[0])
    private = register_digits(clients[0], owner, epsilon=100.0)
    public = register_digits(clients[0], owner, epsilon=None)
    specs: list[dict[str, Any]] = [
        dp_job_spec(private, epsilon=0.5, epochs=2),
        {**dp_job_spec(public, epochs=2), "privacy": None},
    ]
    start = threading.Barrier(SUBMITS)
    answers: list[Any] = [None] * SUBMITS

    def submit(i: int) -> None:
        client, spec = clients[i % 2], specs[(i // 2) % 2]
        start.wait()
        answers[i] = client.post("/v1/jobs", json=spec, headers=owner)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(SUBMITS)]
    # act
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    # assert
    codes = Counter(a.status_code for a in answers)
    assert codes == {202: CAP, 429: SUBMITS - CAP}, codes
    for refused in (a for a in answers if a.status_code == 429):
        assert refused.headers["retry-after"] == "30"
        assert refused.json()["limit"] == CAP
    jobs = clients[1].get("/v1/jobs", headers=owner, params={"status": "queued"}).json()
    assert len(jobs["items"]) == CAP
    budget = clients[1].get(f"/v1/datasets/{private}/budget", headers=owner).json()
    admitted_private = sum(1 for j in jobs["items"] if j["dataset_id"] == private)
    assert (budget["epsilon_reserved"] > 0) == (admitted_private > 0)
