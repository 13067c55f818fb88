"""Webhooks end to end: a real ``ppml serve`` (API + worker) POSTs signed job events to a
receiver on localhost; a 500 is retried, and a delivery survives a kill -9 of the service."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ppml.jobs.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, verify
from tests.conftest import dp_job_spec, new_tenant, register_digits
from tests.integration.stack import embedded_serve, kill_tree, tenant_client, wait_for_status

ADMIN = "webhook-admin-token-0123456789"
FAST = {
    "PPML_WEBHOOKS__ALLOW_PRIVATE_ADDRESSES": "true",
    "PPML_WEBHOOKS__POLL_S": "0.2",
    "PPML_WEBHOOKS__BACKOFF_S": "0.3",
}


@dataclass
class Receiver:
    """An HTTP endpoint on localhost that records every POST and answers ``status``."""

    status: int = 500
    calls: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    url: str = ""

    def wait(self, predicate: Any, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.calls):
                return
            time.sleep(0.1)
        raise AssertionError(f"receiver never saw what was expected: {self.calls}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = state.status
            state.calls.append((dict(self.headers.items()), body, answer))
            self.send_response(answer)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/ppml"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def _verified(secret: str, headers: dict[str, str], body: bytes) -> bool:
    return verify(secret, body, headers[SIGNATURE_HEADER])


def test_a_job_end_is_posted_signed_retried_after_500_and_survives_a_kill(
    tmp_path: Path, receiver: Receiver
) -> None:
    # arrange: the receiver fails until told otherwise
    with embedded_serve(tmp_path, ADMIN, **FAST) as (base, proc):
        client = tenant_client(base, ADMIN)
        dataset = register_digits(client, {})
        spec = {**dp_job_spec(dataset, epochs=2), "webhook_url": receiver.url}
        created = client.post("/v1/jobs", json=spec)
        assert created.status_code == 202, created.text
        job_id, secret = created.json()["id"], created.json()["webhook_secret"]
        polled = client.get(f"/v1/jobs/{job_id}").json()
        wait_for_status(client, job_id, {"succeeded"})
        # act: at least two attempts answered 500, then the service dies (kill -9)
        receiver.wait(lambda calls: len(calls) >= 2)
        kill_tree(proc)
    receiver.status = 200
    with embedded_serve(tmp_path, ADMIN, **FAST) as (_base, _proc):
        receiver.wait(lambda calls: any(answer == 200 for _h, _b, answer in calls))
    # assert: every attempt carries the same event and delivery id, each signed afresh
    assert secret.startswith("whsec_") and polled["webhook_secret"] is None
    bodies = {body for _h, body, _a in receiver.calls}
    deliveries = {headers[DELIVERY_HEADER] for headers, _b, _a in receiver.calls}
    assert len(bodies) == 1 and len(deliveries) == 1
    assert all(_verified(secret, h, b) for h, b, _a in receiver.calls)
    headers, body, _answer = receiver.calls[-1]
    event = json.loads(body)
    assert event["type"] == "job.succeeded" == headers[EVENT_HEADER]
    assert event["id"] == headers[DELIVERY_HEADER]
    job = event["data"]["job"]
    assert job["id"] == job_id and job["status"] == "succeeded"
    assert job["privacy"]["epsilon_spent"] > 0
    assert job["metrics"]["release"]["mechanism"] == "gaussian"  # what analysts see
    # what a receiver refuses: another secret, a changed body, a replay after the tolerance
    assert not verify("whsec_other", body, headers[SIGNATURE_HEADER])
    assert not verify(secret, body.replace(b"succeeded", b"failed"), headers[SIGNATURE_HEADER])
    sent_at = int(headers[SIGNATURE_HEADER].split(",")[0].removeprefix("t="))
    assert not verify(secret, body, headers[SIGNATURE_HEADER], now=sent_at + 301)


def test_a_cancelled_job_posts_its_event_once_and_the_spec_takes_http_urls_only(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.status = 204
    with embedded_serve(tmp_path, ADMIN, **FAST) as (base, _proc):
        client = tenant_client(base, ADMIN)
        dataset = register_digits(client, {})
        spec = {**dp_job_spec(dataset, epochs=1000), "webhook_url": receiver.url}
        created = client.post("/v1/jobs", json=spec).json()
        assert client.post(f"/v1/jobs/{created['id']}/cancel").status_code == 202
        wait_for_status(client, created["id"], {"cancelled"})
        receiver.wait(lambda calls: len(calls) >= 1)
        bad_scheme = client.post("/v1/jobs", json={**spec, "webhook_url": "ftp://example.com/x"})
    headers, body, _answer = receiver.calls[0]
    assert json.loads(body)["type"] == "job.cancelled"
    assert _verified(created["webhook_secret"], headers, body)
    assert len(receiver.calls) == 1  # a 2xx ends it
    assert bad_scheme.status_code == 422 and "webhook_url" in bad_scheme.text


def test_without_the_setting_a_private_address_is_refused_and_nothing_stored(
    client: TestClient,
) -> None:
    tenant = new_tenant(client)
    dataset = register_digits(client, tenant)
    urls = ["http://127.0.0.1:8080/x", "http://localhost:9/x", "http://[::1]/x", "http://10.0.0.7/"]

    answers = [
        client.post("/v1/jobs", json={**dp_job_spec(dataset), "webhook_url": url}, headers=tenant)
        for url in urls
    ]

    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.json()["field"] == "webhook_url"
    assert client.get("/v1/jobs", headers=tenant).json()["items"] == []
    budget = client.get(f"/v1/datasets/{dataset}/budget", headers=tenant).json()
    assert budget["epsilon_reserved"] == 0
