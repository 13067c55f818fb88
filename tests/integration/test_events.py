"""GET /v1/jobs/{id}/events: server-sent events read without a thread per follower."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ppml.config import Settings
from ppml.db.models import JobEventKind, JobStatus
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.jobs import lifecycle
from ppml.jobs.records import Progress
from ppml.jobs.runner import JobRunner
from ppml.privacy.evaluation import exact_metrics, release_outcome
from ppml.privacy.ledger import Ledger
from tests.conftest import dp_job_spec, new_key, new_tenant, new_tenant_id, register_digits


def _events(text: str) -> list[tuple[str, dict[str, object]]]:
    found = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((fields["event"], json.loads(fields["data"])))
    return found


def test_a_finished_jobs_stream_says_its_status_progress_and_end_then_closes(
    client: TestClient, tenant: dict[str, str]
) -> None:
    # arrange: a job cancelled while queued is terminal at once
    dataset_id = register_digits(client, tenant)
    job = client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=tenant).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant).status_code == 202
    # act
    response = client.get(f"/v1/jobs/{job['id']}/events", headers=tenant)
    # assert
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert [name for name, _ in events] == ["progress", "status", "end"]
    assert events[1][1] == {"status": "cancelled"}
    assert events[2][1]["id"] == job["id"] and events[2][1]["status"] == "cancelled"


def test_another_tenants_stream_is_not_found(client: TestClient, tenant: dict[str, str]) -> None:
    dataset_id = register_digits(client, tenant)
    job = client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=tenant).json()
    response = client.get(f"/v1/jobs/{job['id']}/events", headers=new_tenant(client))
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


# --- the persisted sequence, resume, keep-alive, limits ---------------------------------------


def _blocks(text: str) -> list[dict[str, str]]:
    """Every block of a stream with its fields (``""`` holds a comment), per the SSE format."""
    found = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        found.append(fields)
    return found


@contextmanager
def _app(settings: Settings, database: Database, **events: Any) -> Iterator[TestClient]:
    """The app with these event stream settings."""
    config = settings.events.model_copy(update=events)
    app = create_app(settings.model_copy(update={"events": config}), database)
    with TestClient(app) as test_client:
        yield test_client


def _submitted(client: TestClient, headers: dict[str, str]) -> str:
    dataset_id = register_digits(client, headers)
    job = client.post("/v1/jobs", json=dp_job_spec(dataset_id), headers=headers)
    assert job.status_code == 202, job.text
    return str(job.json()["id"])


def _run_to_the_end(
    database: Database, settings: Settings, job_id: str, *, scored: bool = False
) -> None:
    """A worker's life of the job, through the runner's own steps: claim, three reports (the
    last repeats the second), and the end, charged 10 steps (``scored``: the first report
    carries exact held-out scores, and the end releases scores under the job's plan)."""
    worker = JobRunner(database, settings, owner="worker-a")
    assert worker.claim(job_id) is not None
    for steps in (5, 10, 10):
        progress = Progress(fraction=steps / 100, epoch=0, steps=steps)
        scores = exact_metrics(SCORES) if scored and steps == 5 else None
        assert worker.heartbeat(job_id, progress, steps, scores) == (True, False)
    with database.session(write=True) as session:
        repos = Repositories(session)
        job = repos.job_by_id(job_id)
        assert job is not None
        Ledger(repos).lock(job.dataset_id)
        job = repos.job_by_id(job_id, lock=True)
        assert job is not None
        final = Progress(fraction=1.0, epoch=1, steps=10)
        released = None
        if scored:
            assert job.privacy is not None and job.privacy.evaluation is not None
            released = release_outcome(SCORES, None, job.privacy.evaluation)
        ending = lifecycle.Ending(
            status=JobStatus.SUCCEEDED,
            steps=10,
            note="succeeded",
            progress=final,
            released=released,
        )
        lifecycle.finish(repos, job, ending)


# What a worker's scoring of 360 held-out rows hands the release (exact and per-unit sums).
SCORES = {
    "test_accuracy": 0.9,
    "test_loss": 0.3,
    "rows": 360.0,
    "units": 360.0,
    "unit_correct_sum": 324.0,
    "unit_clipped_loss_sum": 108.0,
}


def test_a_jobs_metrics_history_is_its_reports_then_its_released_scores_exact_for_owners_only(
    client: TestClient,
    owner_and_analyst: tuple[dict[str, str], dict[str, str]],
    database: Database,
    settings: Settings,
) -> None:
    # arrange: a job run to the end with scores, read by the owner, an analyst, a stranger
    owner, analyst = owner_and_analyst
    job_id = _submitted(client, owner)
    _run_to_the_end(database, settings, job_id, scored=True)
    url = f"/v1/jobs/{job_id}/metrics"
    replay = {"Last-Event-ID": "0"}
    # act
    as_owner = client.get(url, headers=owner)
    as_analyst = client.get(url, headers=analyst)
    owner_stream = _blocks(
        client.get(f"/v1/jobs/{job_id}/events", headers={**owner, **replay}).text
    )
    analyst_stream = _blocks(
        client.get(f"/v1/jobs/{job_id}/events", headers={**analyst, **replay}).text
    )
    after_two = client.get(url, params={"after": 2}, headers=owner)
    stranger = client.get(url, headers=new_tenant(client))
    job = client.get(f"/v1/jobs/{job_id}", headers=analyst).json()
    # assert: one point per progress event (ids of the stream), ε rising to the job's
    owned, seen = as_owner.json(), as_analyst.json()
    assert as_owner.status_code == 200 and as_analyst.status_code == 200, as_owner.text
    assert [(p["seq"], p["steps"]) for p in owned["points"]] == [(2, 5), (4, 10), (5, 10)]
    assert owned["points"] == seen["points"] and owned["status"] == "succeeded"
    spent = [p["epsilon_spent"] for p in owned["points"]]
    assert spent[-1] == pytest.approx(job["privacy"]["epsilon_spent"])
    assert (
        owned["points"][0]["eta_seconds"] is not None and owned["points"][-1]["eta_seconds"] is None
    )
    assert owned["next_after"] is None
    # the released scores are the job's, for both roles; exact figures only for the owner
    assert (
        seen["released"] == [job["metrics"]]
        and job["metrics"]["release"]["mechanism"] == "gaussian"
    )
    assert seen["exact"] is None
    assert owned["exact"][0]["test_accuracy"] == 0.9 and owned["exact"][0]["rows"] == 360
    assert [p["seq"] for p in after_two.json()["points"]] == [4, 5]
    # the scores event (seq 3) reaches the owner's stream, not the analyst's
    assert [(b["id"], b["event"]) for b in owner_stream if b.get("event") == "scores"] == [
        ("3", "scores")
    ]
    assert (
        json.loads(next(b for b in owner_stream if b.get("event") == "scores")["data"])[
            "test_accuracy"
        ]
        == 0.9
    )
    assert [(b["id"], b["event"]) for b in analyst_stream] == [
        ("1", "status"),
        ("2", "progress"),
        ("4", "progress"),
        ("5", "progress"),
        ("6", "status"),
        ("6", "end"),
    ]
    assert stranger.status_code == 404
    assert stranger.headers["content-type"] == "application/problem+json"


def test_every_change_of_status_and_progress_is_one_event_of_the_jobs_sequence(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings
) -> None:
    # arrange
    job_id = _submitted(client, tenant)
    # act
    _run_to_the_end(database, settings, job_id)
    # assert: the claim, two reports (not the repeat), the final progress, then the end
    with database.read_one() as session:
        events = Repositories(session).job_events(job_id, after=0)
    with database.read_one() as session:
        row = Repositories(session).job_by_id(job_id)
    assert row is not None
    assert [(e.seq, e.kind) for e in events] == [
        (1, "status"),
        (2, "progress"),
        (3, "progress"),
        (4, "progress"),
        (5, "status"),
    ]
    assert events[0].data == {"status": "running"} and events[4].data == {"status": "succeeded"}
    assert events[2].data["steps"] == 10
    assert row.last_event_seq == 5
    assert row.progress.model_dump(mode="json") == events[3].data  # what the job shows
    assert row.privacy is not None and events[3].data["epsilon_spent"] == pytest.approx(
        row.privacy.epsilon_spent
    )


def test_a_stream_resumes_after_last_event_id_and_a_new_follower_starts_from_the_job(
    client: TestClient, tenant: dict[str, str], database: Database, settings: Settings
) -> None:
    # arrange
    job_id = _submitted(client, tenant)
    _run_to_the_end(database, settings, job_id)
    url = f"/v1/jobs/{job_id}/events"
    # act
    resumed = client.get(url, headers={**tenant, "Last-Event-ID": "2"})
    replayed = client.get(url, headers={**tenant, "Last-Event-ID": "0"})
    fresh = client.get(url, headers=tenant)
    unknown = client.get(url, headers={**tenant, "Last-Event-ID": "99"})
    malformed = client.get(url, headers={**tenant, "Last-Event-ID": "soon"})
    # assert: exactly what came after the id, then the end (with the id of the last event)
    blocks = _blocks(resumed.text)
    assert [(b["id"], b["event"]) for b in blocks] == [
        ("3", "progress"),
        ("4", "progress"),
        ("5", "status"),
        ("5", "end"),
    ]
    assert blocks[0]["retry"] == str(settings.events.retry_ms)
    assert all("retry" not in b for b in blocks[1:])
    end = json.loads(blocks[-1]["data"])
    assert end["id"] == job_id and end["status"] == "succeeded"
    assert "exact_metrics" not in end
    assert [b["id"] for b in _blocks(replayed.text)] == ["1", "2", "3", "4", "5", "5"]
    # no id (or one this job never sent): the job as it stands, at the seq it reflects
    for response in (fresh, unknown):
        started = _blocks(response.text)
        assert [(b["id"], b["event"]) for b in started] == [
            ("5", "progress"),
            ("5", "status"),
            ("5", "end"),
        ]
        assert json.loads(started[0]["data"])["fraction"] == 1.0
    assert malformed.status_code == 422


def test_a_quiet_stream_keeps_alive_and_ends_after_its_maximum_duration(
    settings: Settings, database: Database
) -> None:
    with _app(settings, database, poll_s=0.05, keepalive_s=0.2, max_duration_s=1.0) as client:
        # arrange: a queued job: nothing happens to it
        headers = new_tenant(client)
        job_id = _submitted(client, headers)
        # act
        began = time.monotonic()
        response = client.get(f"/v1/jobs/{job_id}/events", headers=headers)
        took = time.monotonic() - began
        # assert: where it stands, then comments only, and it closed on its own (no end)
        blocks = _blocks(response.text)
        assert [b.get("event") for b in blocks[:2]] == ["progress", "status"]
        assert blocks[1]["id"] == "0" and json.loads(blocks[1]["data"]) == {"status": "queued"}
        keepalives = blocks[2:]
        assert len(keepalives) >= 3 and all(b == {"": "keep-alive"} for b in keepalives)
        assert 1.0 <= took < 5.0
        assert client.app.state.streams.total == 0  # type: ignore[attr-defined]


def test_a_resumed_quiet_stream_starts_with_a_keep_alive_that_says_retry(
    settings: Settings, database: Database
) -> None:
    with _app(settings, database, poll_s=0.05, max_duration_s=0.3, retry_ms=1234) as client:
        headers = new_tenant(client)
        job_id = _submitted(client, headers)
        response = client.get(
            f"/v1/jobs/{job_id}/events", headers={**headers, "Last-Event-ID": "0"}
        )
        assert _blocks(response.text) == [{"": "keep-alive", "retry": "1234"}]


def test_a_tenant_holding_its_cap_of_streams_is_answered_429_and_others_are_not(
    settings: Settings, database: Database
) -> None:
    with _app(settings, database, max_per_tenant=2, retry_after_s=7) as client:
        # arrange: the tenant's two slots are taken (as by two open streams)
        tenant_id = new_tenant_id(client)
        headers = new_key(client, tenant_id)
        job_id = _submitted(client, headers)
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 202
        other = new_tenant(client)
        other_job = _submitted(client, other)
        assert client.post(f"/v1/jobs/{other_job}/cancel", headers=other).status_code == 202
        slots = client.app.state.streams  # type: ignore[attr-defined]
        assert slots.take(tenant_id) and slots.take(tenant_id)
        # act
        refused = client.get(f"/v1/jobs/{job_id}/events", headers=headers)
        served = client.get(f"/v1/jobs/{other_job}/events", headers=other)
        slots.give_back(tenant_id)
        after = client.get(f"/v1/jobs/{job_id}/events", headers=headers)
        # assert
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"] == "7"
        assert refused.json()["type"].endswith("too-many-requests")
        assert served.status_code == 200 and after.status_code == 200
        assert slots.total == 1  # the finished streams gave their slots back


def test_concurrent_writers_of_one_job_never_share_a_seq(
    client: TestClient, tenant: dict[str, str], database: Database
) -> None:
    # arrange
    job_id = _submitted(client, tenant)

    def append(n: int) -> list[int]:
        seqs = []
        for step in range(n):
            with database.session(write=True) as session:
                data = {"fraction": 0.0, "epoch": 0, "steps": step}
                seqs.append(
                    Repositories(session).append_job_event(job_id, JobEventKind.PROGRESS, data)
                )
        return seqs

    # act
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(append, [10] * 4))
    # assert
    seqs = sorted(s for result in results for s in result)
    assert seqs == list(range(1, 41))
    with database.read_one() as session:
        events = Repositories(session).job_events(job_id, after=0)
        row = Repositories(session).job_by_id(job_id)
    assert [e.seq for e in events] == seqs and row is not None and row.last_event_seq == 40
