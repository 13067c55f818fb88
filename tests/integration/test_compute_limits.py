"""Issue #15, finding 4: every job's compute estimate, with a per-job limit (422 at quote and
submit, nothing stored) and a per-tenant limit on its queued and running jobs (429 at submit,
exact under concurrent submits to two API processes on PostgreSQL).

The digits job of these tests (an MLP 64-128-10, 2 epochs at batch 128) is estimated at
about 3e7 sample-gradients × parameters; the limits are set around it.
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
from ppml.config import Settings
from ppml.db.session import Database
from tests.conftest import ADMIN_TOKEN, dp_job_spec, new_tenant, register_digits

JOB_LIMIT = 10**8  # fits a 2-epoch job (3e7), not a 30-epoch one (4.4e8)
TENANT_LIMIT = 15 * 10**7  # about five 2-epoch jobs
SUBMITS = 60


def _limited(settings: Settings) -> Settings:
    limits = settings.limits.model_copy(
        update={"max_job_compute": JOB_LIMIT, "max_tenant_compute": TENANT_LIMIT}
    )
    return settings.model_copy(update={"limits": limits})


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings, with compute limits this module's jobs reach."""
    return _limited(settings)


def _quote(client: TestClient, headers: dict[str, str], spec: dict[str, Any]) -> int:
    answer = client.post("/v1/jobs/quote", json=spec, headers=headers)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["compute"])


def _jobs(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.get("/v1/jobs", headers=headers).json()["items"]
    return items


def test_the_estimate_is_quoted_and_stored_on_the_job(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange
    dataset_id = register_digits(client, tenant)
    spec = dp_job_spec(dataset_id, epsilon=1.0, epochs=2)
    # act
    quoted = _quote(client, tenant, spec)
    job = client.post("/v1/jobs", json=spec, headers=tenant)
    # assert
    assert job.status_code == 202, job.text
    assert 0 < quoted <= JOB_LIMIT and job.json()["compute"] == quoted
    assert client.get(f"/v1/jobs/{job.json()['id']}", headers=tenant).json()["compute"] == quoted


def test_a_job_over_the_per_job_limit_is_a_422_with_figures_and_stores_nothing(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange
    dataset_id = register_digits(client, tenant)
    spec = dp_job_spec(dataset_id, epsilon=1.0, epochs=30)
    # act
    quoted = client.post("/v1/jobs/quote", json=spec, headers=tenant)
    submitted = client.post("/v1/jobs", json=spec, headers=tenant)
    # assert: the same refusal at both, with the estimate and the limit
    for answer in (quoted, submitted):
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        body = answer.json()
        assert body["field"] == "training.epochs"
        assert body["limit"] == JOB_LIMIT and body["compute"] > JOB_LIMIT
    assert quoted.json()["compute"] == submitted.json()["compute"]
    assert _jobs(client, tenant) == []
    budget = client.get(f"/v1/datasets/{dataset_id}/budget", headers=tenant).json()
    assert budget["epsilon_reserved"] == 0
    ledger = client.get(f"/v1/datasets/{dataset_id}/ledger", headers=tenant).json()
    assert ledger["items"] == []


def test_a_tenant_at_its_compute_limit_gets_429_while_another_is_admitted(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange: jobs of one size (one dataset: each registration draws its own split)
    dataset_id = register_digits(client, tenant, epsilon=100.0)
    spec = dp_job_spec(dataset_id, epsilon=0.5, epochs=2)
    each = _quote(client, tenant, spec)
    fitting = TENANT_LIMIT // each
    other = new_tenant(client)
    other_dataset = register_digits(client, other)
    # act
    answers = [client.post("/v1/jobs", json=spec, headers=tenant) for _ in range(fitting + 2)]
    neighbour = client.post(
        "/v1/jobs", json=dp_job_spec(other_dataset, epsilon=0.5, epochs=2), headers=other
    )
    # assert
    assert [a.status_code for a in answers] == [202] * fitting + [429] * 2
    for refused in answers[fitting:]:
        assert refused.headers["retry-after"] == "30"
        body = refused.json()
        assert body["limit"] == TENANT_LIMIT
        assert body["compute_in_use"] == fitting * each
        assert body["compute_requested"] == each
    assert neighbour.status_code == 202, neighbour.text
    assert sum(j["compute"] for j in _jobs(client, tenant)) == fitting * each


def test_a_finished_job_gives_its_compute_back(client: TestClient, tenant: dict[str, str]) -> None:
    # arrange: the tenant at its limit
    dataset_id = register_digits(client, tenant, epsilon=100.0)
    spec = dp_job_spec(dataset_id, epsilon=0.5, epochs=2)
    admitted = []
    while (answer := client.post("/v1/jobs", json=spec, headers=tenant)).status_code == 202:
        admitted.append(answer.json()["id"])
    assert answer.status_code == 429 and admitted
    # act
    cancelled = client.post(f"/v1/jobs/{admitted[0]}/cancel", headers=tenant)
    again = client.post("/v1/jobs", json=spec, headers=tenant)
    # assert
    assert cancelled.status_code == 202
    assert again.status_code == 202, again.text


@pytest.fixture
def two_apps(tmp_path: Path, pg_database_url: str) -> Iterator[list[TestClient]]:
    """Two API apps (two processes' worth of caches and group commits) on one PostgreSQL."""
    settings = _limited(
        Settings(
            data_dir=tmp_path / "data",
            database_url=pg_database_url,
            broker_url="memory://",
            admin_token=ADMIN_TOKEN,
        )
    )
    with ExitStack() as stack:
        apps = []
        for _ in range(2):
            db = Database(pg_database_url)
            stack.callback(db.dispose)
            apps.append(stack.enter_context(TestClient(create_app(settings, db))))
        yield apps


def test_concurrent_submits_never_pass_the_tenant_compute_limit(
    two_apps: list[TestClient],
) -> None:
    # arrange: a private and a public dataset of one tenant, jobs of one size on each
    owner = new_tenant(two_apps[0])
    private = register_digits(two_apps[0], owner, epsilon=100.0)
    public = register_digits(two_apps[0], owner, epsilon=None)
    specs: list[dict[str, Any]] = [
        dp_job_spec(private, epsilon=0.5, epochs=2),
        {**dp_job_spec(public, epochs=2), "privacy": None},
    ]
    sizes = [_quote(two_apps[0], owner, spec) for spec in specs]
    start = threading.Barrier(SUBMITS)
    answers: list[Any] = [None] * SUBMITS

    def submit(i: int) -> None:
        client, spec = two_apps[i % 2], specs[(i // 2) % 2]
        start.wait()
        answers[i] = client.post("/v1/jobs", json=spec, headers=owner)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(SUBMITS)]
    # act
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    # assert: what was admitted fits, and each refusal would not fit on top of it (jobs only
    # accumulate here, so a refusal made on less in use would still be one now)
    codes = Counter(a.status_code for a in answers)
    assert set(codes) == {202, 429} and sum(codes.values()) == SUBMITS, codes
    admitted = sum(sizes[(i // 2) % 2] for i, a in enumerate(answers) if a.status_code == 202)
    assert admitted <= TENANT_LIMIT
    for i, refused in enumerate(answers):
        if refused.status_code != 429:
            continue
        body = refused.json()
        assert refused.headers["retry-after"] == "30" and body["limit"] == TENANT_LIMIT
        assert body["compute_requested"] == sizes[(i // 2) % 2]
        assert body["compute_in_use"] + body["compute_requested"] > TENANT_LIMIT
        assert admitted + body["compute_requested"] > TENANT_LIMIT
    queued = _jobs(two_apps[1], owner)
    assert len(queued) == codes[202] and sum(j["compute"] for j in queued) == admitted
