"""Issue #15, finding 1: idle event streams must not stall the API for anyone else.

Against a real ``ppml serve`` on PostgreSQL: five tenants hold 100 event streams open on
queued jobs (nothing happens to them, so the streams are as idle as streams get) and a sixth
tenant is still served at once; a tenant past its cap is refused with 429; and when the
followers' connections close, the server's open streams drop to zero within 20 s.
"""

from __future__ import annotations

import math
import re
import socket
import time
from pathlib import Path

import httpx

from tests.conftest import dp_job_spec
from tests.integration.stack import embedded_serve, tenant_client

ADMIN = "security-admin-token-0123456789"
TENANTS, PER_TENANT = 5, 20  # the default cap of open streams per tenant
REQUESTS = 100  # nearest-rank p99: the second slowest


def _open_stream(base: str, path: str, authorization: str) -> socket.socket:
    """An event stream whose client reads its response head and then nothing more."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {authorization}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def _open_streams(client: httpx.Client) -> int:
    # /metrics takes the admin token, not the tenant's key the client carries
    text = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    found = re.search(r"^ppml_event_streams_open ([0-9.]+)$", text, re.MULTILINE)
    assert found is not None, text
    return int(float(found.group(1)))


def _p99(samples: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(samples)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def _timed_gets(client: httpx.Client, path: str, count: int) -> list[float]:
    took = []
    for _ in range(count):
        began = time.perf_counter()
        response = client.get(path)
        took.append(time.perf_counter() - began)
        assert response.status_code == 200, response.text
    return took


def test_idle_event_streams_leave_others_served_and_close_when_their_clients_leave(
    tmp_path: Path, pg_database_url: str
) -> None:
    # arrange: no worker, so the jobs stay queued and their streams idle
    with embedded_serve(tmp_path, ADMIN, "--no-worker", PPML_DATABASE_URL=pg_database_url) as (
        base,
        _proc,
    ):
        followers = [tenant_client(base, ADMIN, f"follower-{i}") for i in range(TENANTS)]
        observer = tenant_client(base, ADMIN, "observer")
        body = {"name": "digits", "source": {"builtin": "digits"}}
        budget = {"privacy_budget": {"epsilon": 8.0, "delta": 1e-5}}
        jobs = []
        for client in followers:
            dataset = client.post("/v1/datasets", json={**body, **budget})
            assert dataset.status_code == 201, dataset.text
            job = client.post("/v1/jobs", json=dp_job_spec(dataset.json()["id"]))
            assert job.status_code == 202, job.text
            jobs.append(job.json()["id"])
        assert observer.post("/v1/datasets", json={**body, **budget}).status_code == 201
        _timed_gets(observer, "/v1/datasets", 5)  # warm: the key cache, the pools
        # act: 100 streams held open, then another tenant's reads
        streams = [
            _open_stream(base, f"/v1/jobs/{job_id}/events", client.headers["Authorization"])
            for client, job_id in zip(followers, jobs, strict=True)
            for _ in range(PER_TENANT)
        ]
        try:
            over_cap = followers[0].get(f"/v1/jobs/{jobs[0]}/events", timeout=10)
            held = _open_streams(observer)
            datasets = _timed_gets(observer, "/v1/datasets", REQUESTS)
            health = _timed_gets(observer, "/healthz", 10)
        finally:
            left = time.monotonic()
            for sock in streams:
                sock.close()
        drained = None
        while time.monotonic() - left < 30:
            if _open_streams(observer) == 0:
                drained = time.monotonic() - left
                break
            time.sleep(0.2)
        after = _timed_gets(observer, "/healthz", 3)
    # assert
    print(
        f"\n{len(streams)} idle streams: GET /v1/datasets p50 "
        f"{sorted(datasets)[REQUESTS // 2] * 1000:.1f} ms, p99 {_p99(datasets) * 1000:.1f} ms; "
        f"/healthz max {max(health) * 1000:.1f} ms; streams gone {drained} s after the "
        "clients left"
    )
    assert over_cap.status_code == 429
    assert over_cap.headers["retry-after"].isdigit()
    assert over_cap.headers["content-type"] == "application/problem+json"
    assert held == TENANTS * PER_TENANT
    assert _p99(datasets) < 0.100
    assert max(health) < 0.100
    assert drained is not None and drained < 20, drained
    assert max(after) < 0.100
