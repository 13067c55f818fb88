"""The node's HTTP client rides out server restarts: real sockets, a server that goes away."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ppml.node.client import Backoff, NodeApi


class _Handler(BaseHTTPRequestHandler):
    failures_left = 0
    seen: list[tuple[str, str | None, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _server(port: int) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_backoff_doubles_to_its_cap_with_jitter() -> None:
    backoff = Backoff(first=1.0, cap=30.0, jitter=0.5)
    delays = [backoff.next_delay() for _ in range(8)]
    for delay, nominal in zip(delays, [1, 2, 4, 8, 16, 30, 30, 30], strict=True):
        assert nominal * 0.5 <= delay <= nominal
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_5xx_answers_are_retried_until_the_server_answers() -> None:
    # arrange
    _Handler.failures_left, _Handler.seen = 2, []
    port, sleeps = _free_port(), []
    with _server(port):
        api = NodeApi(
            f"http://127.0.0.1:{port}",
            credential="ppml_node_x",
            backoff=Backoff(first=0.01, cap=0.05),
            sleep=sleeps.append,
        )
        # act
        answer = api.poll(0)
        api.close()
    # assert
    assert answer.status_code == 204 and len(sleeps) == 2
    assert [s[0] for s in _Handler.seen] == ["/v1/node/poll"] * 3
    assert _Handler.seen[-1][1:] == ("Bearer ppml_node_x", {"wait_s": 0})


def test_a_server_restart_is_survived() -> None:
    # arrange: the server is down when the node polls, and comes back a moment later
    _Handler.failures_left, _Handler.seen = 0, []
    port = _free_port()
    api = NodeApi(f"http://127.0.0.1:{port}", backoff=Backoff(first=0.05, cap=0.2))
    back = threading.Event()

    def restart_later() -> None:
        time.sleep(0.5)
        with _server(port):
            back.set()
            time.sleep(3)

    thread = threading.Thread(target=restart_later, daemon=True)
    thread.start()
    # act
    answer = api.poll(0)
    # assert
    assert back.is_set() and answer.status_code == 204
    assert api.backoff.failures == 0  # reset by the answer
    api.close()
    thread.join()
