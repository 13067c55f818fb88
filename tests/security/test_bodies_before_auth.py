"""Issue #15, finding 2: no request body is read before its sender is authenticated.

Against a real ``ppml serve``: 100 MB bodies, streamed (chunked) or declared up front
(``Content-Length``), JSON or multipart, without a key or with a wrong one, are answered 401
after a few MB at most of them were sent (the server never waits for the rest), the server's
memory does not grow, and another client is served meanwhile. A key's own JSON bodies are
limited to ``max_json_bytes`` (1 MiB) and refused with 413 the same way.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, new_tenant
from tests.integration.stack import embedded_serve

BODY = 100 * 1024 * 1024
CHUNK = b"[" + b"1," * (128 * 1024)  # 256 KiB of a JSON array that never ends
MB = 1024 * 1024


@dataclass
class Server:
    base: str
    port: int
    pid: int
    key: str  # an owner's "Bearer ..." value


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("bodies")
    with embedded_serve(root, ADMIN_TOKEN, "--no-worker") as (base, proc):
        key = new_tenant(httpx.Client(base_url=base))["Authorization"]
        yield Server(base, int(base.rsplit(":", 1)[1]), proc.pid, key)


def _rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass
class Watch:
    """The server's peak RSS, and another client's slowest /healthz, while an attack runs."""

    server: Server
    peak_rss: int = 0
    slowest: float = 0.0
    served: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.server.base, timeout=10) as client:
            while not self.stop.is_set():
                self.peak_rss = max(self.peak_rss, _rss(self.server.pid))
                began = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                self.slowest = max(self.slowest, time.perf_counter() - began)
                self.served += 1
                time.sleep(0.02)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _send_body(port: int, head: bytes, *, chunked: bool) -> tuple[bytes, int]:
    """Send ``head``, then up to BODY bytes as fast as the server takes them, stopping at its
    first answer. Returns the answer's first bytes and how many body bytes went out first."""
    frame = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK) if chunked else CHUNK
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        sent, offset, answer = 0, 0, b""
        deadline = time.monotonic() + 60
        while not answer and sent < BODY and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                answer = _recv(sock)
                break
            if writable:
                try:
                    offset += sock.send(frame[offset:])
                except OSError:
                    break  # the server closed the connection after answering
                if offset == len(frame):
                    sent, offset = sent + len(CHUNK), 0
        if not answer:
            sock.setblocking(True)
            sock.settimeout(5)
            answer = _recv(sock)
    return answer, sent


def _head(path: str, content_type: str, authorization: str | None, *, chunked: bool) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Type: {content_type}"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {BODY}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


JSON, MULTIPART = "application/json", "multipart/form-data; boundary=x"
CASES = [
    # (route, content type, who, chunked, expected status)
    ("/v1/jobs", JSON, None, True, 401),
    ("/v1/jobs", JSON, None, False, 401),
    ("/v1/jobs", JSON, "Bearer ppml_sk_guessed", True, 401),
    ("/v1/datasets/upload", MULTIPART, None, True, 401),
    ("/v1/datasets/upload", MULTIPART, None, False, 401),
    ("/v1/tenants", JSON, "owner", True, 401),  # an API key is no admin token
    ("/v1/jobs", JSON, "owner", True, 413),  # JSON bodies: 1 MiB
    ("/v1/jobs", JSON, "owner", False, 413),
    ("/v1/datasets", JSON, "owner", True, 413),
]


@pytest.mark.parametrize(("path", "content_type", "who", "chunked", "status"), CASES)
def test_a_100_mb_body_is_answered_before_it_is_read_and_others_stay_served(
    server: Server, path: str, content_type: str, who: str | None, chunked: bool, status: int
) -> None:
    # arrange
    authorization = server.key if who == "owner" else who
    head = _head(path, content_type, authorization, chunked=chunked)
    watch = Watch(server)
    watcher = threading.Thread(target=watch.run, daemon=True)
    before = _rss(server.pid)
    watcher.start()
    started = time.monotonic()
    # act
    answer, sent = _send_body(server.port, head, chunked=chunked)
    took = time.monotonic() - started
    time.sleep(0.3)  # let the watcher see the server after the attack too
    watch.stop.set()
    watcher.join(timeout=10)
    # assert: the answer came while the client still had most of the body to send
    assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:300]
    assert b"application/problem+json" in answer
    assert sent < 16 * MB, f"{sent / MB:.1f} MB were sent before the answer"
    assert took < 5.0
    growth = watch.peak_rss - before
    assert growth < 50 * MB, f"RSS grew by {growth / MB:.1f} MB"
    assert watch.served > 0 and watch.slowest < 1.0, watch
    print(  # the figures of the closing note (pytest -s)
        f"\n{path} {who or 'anonymous'} {'chunked' if chunked else 'declared'}: "
        f"{answer[9:12].decode()} after {sent / MB:.2f} MB sent, {took * 1000:.0f} ms; "
        f"RSS +{growth / MB:.1f} MB; /healthz ×{watch.served}, slowest "
        f"{watch.slowest * 1000:.0f} ms"
    )


def test_a_keyed_json_body_under_the_limit_still_works(server: Server) -> None:
    # A 900 KB JSON body with a key is parsed as before (and refused for what it says).
    with httpx.Client(base_url=server.base, headers={"Authorization": server.key}) as client:
        answer = client.post("/v1/jobs", json={"name": "x" * (900 * 1024)})
    assert answer.status_code == 422, answer.text
