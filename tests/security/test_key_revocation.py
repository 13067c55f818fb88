"""Issue #15, finding 6: a revoked API key is refused within a second by every API process.

Two ``ppml serve`` processes on one PostgreSQL database, each using the key every 20 ms (so
each holds it in its key cache), until the admin revokes it through one of them; both refuse
it within a second of the revocation's answer, and from then on.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from tests.conftest import ADMIN_TOKEN, admin_headers
from tests.integration.stack import embedded_serve


class Poller(threading.Thread):
    """Uses the key on one server until it is refused; remembers when, and what came after."""

    def __init__(self, base: str, key: str) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        self.ok = 0
        self.refused_at: float | None = None
        self.after: list[int] = []

    def run(self) -> None:
        with self.client:
            while self.refused_at is None:
                status = self.client.get("/v1/datasets").status_code
                if status == 401:
                    self.refused_at = time.monotonic()
                else:
                    assert status == 200, status
                    self.ok += 1
                time.sleep(0.02)
            self.after = [self.client.get("/v1/datasets").status_code for _ in range(20)]


def test_a_revoked_key_is_refused_within_a_second_by_two_api_processes(
    tmp_path: Path, pg_database_url: str
) -> None:
    # arrange: two API processes on one database, both using the key
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with ExitStack() as stack:
        bases = [
            stack.enter_context(
                embedded_serve(
                    tmp_path / name, ADMIN_TOKEN, "--no-worker", PPML_DATABASE_URL=pg_database_url
                )
            )[0]
            for name in ("a", "b")
        ]
        tenant = httpx.post(f"{bases[0]}/v1/tenants", json={"name": "t"}, headers=admin_headers())
        tenant_id = tenant.json()["id"]
        key = httpx.post(f"{bases[1]}/v1/tenants/{tenant_id}/api-keys", headers=admin_headers())
        pollers = [Poller(base, key.json()["key"]) for base in bases]
        for poller in pollers:
            poller.start()
        time.sleep(1.0)
        # act
        revoked = httpx.delete(
            f"{bases[0]}/v1/tenants/{tenant_id}/api-keys/{key.json()['id']}",
            headers=admin_headers(),
        )
        answered = time.monotonic()
        for poller in pollers:
            poller.join(timeout=10)
    # assert
    assert revoked.status_code == 204
    for base, poller in zip(bases, pollers, strict=True):
        assert poller.ok > 10, "the key was in use before the revocation"
        assert poller.refused_at is not None, f"{base} still accepts the revoked key"
        delay = poller.refused_at - answered
        assert delay < 1.0, f"{base} refused the key {delay:.3f} s after its revocation"
        assert poller.after == [401] * 20
        print(f"\n{base}: refused {max(delay, 0) * 1000:.0f} ms after the revocation's 204")
