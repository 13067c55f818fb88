"""Real service processes for integration tests: `ppml serve` and `ppml worker`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(PPML_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", **overrides)
    return env


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in its own session (so a kill reaches its children), logged to a file."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        kill_tree(proc)


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a test's process and every process below it, wherever their groups are (an
    embedded worker has its own). Teardown does not test graceful shutdown (tests that do
    call :func:`stop`), and a graceful stop of a worker takes seconds."""
    below = _descendants(proc.pid)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _descendants(pid: int) -> list[int]:
    """Live processes below ``pid``, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_ready(
    base_url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited early:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"service not ready:\n{log.read_text()[-4000:]}")


def wait_for_status(
    client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 180
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {statuses}; last: {job}")


@contextmanager
def embedded_serve(
    root: Path, admin_token: str, *args: str, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``ppml serve`` on the embedded default (API + worker, SQLite, filesystem broker) with
    its data under ``root/data``; yields its base URL and process once it is ready.

    ``args`` are more ``ppml serve`` options, ``env`` more ``PPML_*`` settings (e.g.
    ``PPML_DATABASE_URL``)."""
    port = free_port()
    env = service_env(root / "data", PPML_ADMIN_TOKEN=admin_token, **env)
    log = root / "serve.log"
    command = [str(BIN / "ppml"), "serve", "--port", str(port), *args]
    with process(command, env, log) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, log)
        yield base, proc


def tenant_client(base: str, admin_token: str, name: str = "clinic") -> httpx.Client:
    """A new tenant's client on the service at ``base``: its owner key in every request."""
    admin = {"Authorization": f"Bearer {admin_token}"}
    tenant = httpx.post(f"{base}/v1/tenants", json={"name": name}, headers=admin)
    assert tenant.status_code == 201, tenant.text
    key = httpx.post(f"{base}/v1/tenants/{tenant.json()['id']}/api-keys", headers=admin)
    assert key.status_code == 201
    return httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {key.json()['key']}"}, timeout=30
    )
