"""``ppml serve`` never leaves its embedded worker behind: not on SIGTERM, not on SIGKILL."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.stack import embedded_serve


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found |= {int(child) for child in text}
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not reaped it


def _worker_of(pid: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(pid):
            if b"worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        time.sleep(0.2)
    raise AssertionError("the embedded worker never started")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_embedded_worker_goes_when_serve_goes(tmp_path: Path, sig: signal.Signals) -> None:
    # arrange
    with embedded_serve(tmp_path, "signals-admin-token-0123456789") as (_base, proc):
        worker = _worker_of(proc.pid)
        # act
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        # assert: the worker is gone too, within a Celery warm shutdown
        deadline = time.monotonic() + 30
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), f"worker {worker} outlived ppml serve ({sig.name})"
