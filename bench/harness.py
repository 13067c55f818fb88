"""Shared pieces of the benchmarks: start a real ppml stack, time requests, print and save."""

from __future__ import annotations

import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get(
    "PPML_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
ADMIN_TOKEN = "bench-admin-token-0123456789"
RESULTS = Path(__file__).parent / "results"


def _processes() -> tuple[dict[int, int], dict[int, float], dict[int, str]]:
    """Every live process's parent, CPU seconds (user + system) and title (Linux)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    titles: dict[int, str] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                title = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(entry)
        parents[pid], titles[pid] = int(fields[1]), title
        times[pid] = (int(fields[11]) + int(fields[12])) / tick
    return parents, times, titles


def cpu_seconds(pids: dict[str, int], database: str | None) -> dict[str, float]:
    """CPU seconds of each named process with its live descendants, and (``postgres``) of
    the PostgreSQL backends connected to ``database``."""
    parents, times, titles = _processes()
    used = {}
    for role, root in pids.items():
        tree, frontier = {root}, [root]
        while frontier:
            parent = frontier.pop()
            children = [child for child, p in parents.items() if p == parent and child not in tree]
            tree.update(children)
            frontier += children
        used[role] = sum(times.get(member, 0.0) for member in tree)
    if database:
        backend = f" {database} "
        used["postgres"] = sum(times[pid] for pid, title in titles.items() if backend in title)
    return used


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one benchmark run, dropped afterwards."""
    name = f"ppml_bench_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Service:
    base: str
    workdir: Path
    pids: dict[str, int] = field(default_factory=dict)  # "api", "worker0", ...
    database: str | None = None  # the PostgreSQL database's name

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each process has used so far, its descendants included,
        and PostgreSQL's for this stack's database: divided by the requests served between
        two readings, a cost per request that another load on the machine disturbs far less
        than it disturbs throughput."""
        return cpu_seconds(self.pids, self.database)

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=headers or {}, timeout=60)

    def tenant(self) -> dict[str, str]:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with self.client(admin) as client:
            tenant = client.post("/v1/tenants", json={"name": f"b{secrets.token_hex(4)}"}).json()
            key = client.post(f"/v1/tenants/{tenant['id']}/api-keys").json()["key"]
        return {"Authorization": f"Bearer {key}"}


@contextmanager
def stack(
    workdir: Path,
    *,
    database_url: str | None,
    broker_url: str = "memory://",
    workers: int = 0,
    api_workers: int = 1,
    env: dict[str, str] | None = None,
) -> Iterator[Service]:
    """``ppml serve --no-worker --workers api_workers`` plus ``workers`` separate
    ``ppml worker`` processes."""
    workdir.mkdir(parents=True, exist_ok=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    environment.update(
        PPML_DATA_DIR=str(workdir / "data"),
        PPML_ADMIN_TOKEN=ADMIN_TOKEN,
        PPML_BROKER_URL=broker_url,
        PPML_LIMITS__MAX_ACTIVE_JOBS_PER_TENANT="1000000",
        **(env or {}),
    )
    if database_url:
        environment["PPML_DATABASE_URL"] = database_url
    port = free_port()
    with ExitStack() as stack_:
        api = _spawn(
            [
                *(str(BIN / "ppml"), "serve", "--no-worker", "--port", str(port)),
                *("--workers", str(api_workers)),
            ],
            environment,
            workdir / "api.log",
            stack_,
        )
        name = database_url.rsplit("/", 1)[1] if database_url else None
        service = Service(f"http://127.0.0.1:{port}", workdir, {"api": api.pid}, name)
        _wait_ready(service.base, api, workdir / "api.log")
        for i in range(workers):
            worker = _spawn(
                [str(BIN / "ppml"), "worker"], environment, workdir / f"worker{i}.log", stack_
            )
            service.pids[f"worker{i}"] = worker.pid
        yield service


def _spawn(
    args: list[str], env: dict[str, str], log: Path, stack_: ExitStack
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    stack_.callback(stop)
    return proc


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("service did not become ready")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarise(latencies_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in latencies_s]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
    }


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) if not isinstance(c, float) else f"{c:.2f}" for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def save(name: str, data: dict[str, Any], path: Path | None = None) -> Path:
    target = path or RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, sort_keys=True))
    print(f"\nwrote {target}")
    return target
