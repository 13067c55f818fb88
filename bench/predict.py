"""Predict latency of a real ``ppml serve`` against the same run's ``/healthz`` ceiling.

Starts the embedded service (SQLite, serverless broker, its own worker) in a temporary folder,
trains one small DP model on digits, then times ``POST /v1/jobs/{id}/predict`` with 1 and 256
rows, from 1 and from N concurrent keep-alive clients, next to ``GET /healthz`` (no auth, no
database: what the HTTP stack alone costs on this machine). Prints a table and writes JSON.

    .venv/bin/python bench/predict.py [--clients 16] [--requests 1600] [--out PATH]

The clients share the machine with the server: on a small box their own CPU time is part of
every figure, for the ceiling and for predictions alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ADMIN = "bench-admin-token-0123456789"
GOAL_P99_MS = 20.0
ROOT = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """``ppml serve`` on a free port, stopped (with its worker) on exit."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(PPML_DATA_DIR=str(folder / "data"), PPML_ADMIN_TOKEN=ADMIN)
    log = (folder / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "ppml"), "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((folder / "serve.log").read_text()[-3000:])
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def train(base: str) -> tuple[dict[str, str], dict[str, Any]]:
    """A tenant, digits with a budget, and one small DP model; returns (auth headers, job)."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    tenant = httpx.post(f"{base}/v1/tenants", json={"name": "bench"}, headers=admin).json()
    key = httpx.post(f"{base}/v1/tenants/{tenant['id']}/api-keys", headers=admin).json()["key"]
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        dataset = client.post(
            "/v1/datasets",
            json={
                "name": "digits",
                "source": {"builtin": "digits"},
                "privacy_budget": {"epsilon": 8.0, "delta": 1e-5},
            },
        ).json()
        spec = {
            "name": "bench",
            "dataset_id": dataset["id"],
            "model": {"arch": "mlp", "hidden_sizes": [128]},
            "training": {"epochs": 5, "batch_size": 128, "learning_rate": 0.5, "seed": 0},
            "privacy": {"target_epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0},
            "federated": None,
        }
        submitted = client.post("/v1/jobs", json=spec)
        if submitted.status_code != 202:
            raise RuntimeError(f"job refused: {submitted.text}")
        job = submitted.json()
        deadline = time.monotonic() + 300
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"training did not finish: {job}")
            time.sleep(0.5)
            job = client.get(f"/v1/jobs/{job['id']}").json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"training failed: {job}")
    return headers, job


def measure(
    clients: int, requests: int, call: Callable[[httpx.Client], httpx.Response], base: str
) -> dict[str, float]:
    """Latencies of ``requests`` calls spread over ``clients`` threads, each with a client."""
    per_client = max(1, requests // clients)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    failures: list[str] = []

    def work(index: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            for _ in range(5):  # warm the connection and the server's caches
                call(client)
            barrier.wait()
            for _ in range(per_client):
                start = time.perf_counter()
                response = call(client)
                latencies[index].append((time.perf_counter() - start) * 1e3)
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, e.g. {failures[0]}")
    flat = np.concatenate([np.asarray(x) for x in latencies])
    return {
        "requests": int(flat.size),
        "p50_ms": float(np.percentile(flat, 50)),
        "p99_ms": float(np.percentile(flat, 99)),
        "mean_ms": float(flat.mean()),
        "throughput_rps": float(flat.size / elapsed),
    }


def run(clients: int, requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ppml-bench-") as folder, serve(Path(folder)) as base:
        headers, job = train(base)
        x = np.random.default_rng(0).uniform(0, 1, size=(256, 64)).round(4)
        bodies = {1: {"inputs": x[:1].tolist()}, 256: {"inputs": x.tolist()}}
        path = f"/v1/jobs/{job['id']}/predict"

        def health(client: httpx.Client) -> httpx.Response:
            return client.get("/healthz")

        def predictor(rows: int) -> Callable[[httpx.Client], httpx.Response]:
            return lambda client: client.post(path, json=bodies[rows], headers=headers)

        scenarios: list[tuple[str, int, Callable[[httpx.Client], httpx.Response]]] = [
            ("healthz", 0, health),
            ("predict", 1, predictor(1)),
            ("predict", 256, predictor(256)),
        ]
        results = []
        for concurrency in (1, clients):
            total = requests if concurrency > 1 else max(200, requests // 4)
            for name, rows, call in scenarios:
                figures = measure(concurrency, total, call, base)
                results.append({"endpoint": name, "rows": rows, "clients": concurrency, **figures})
    one_row = [r for r in results if r["endpoint"] == "predict" and r["rows"] == 1]
    return {
        "benchmark": "predict",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "model": {"arch": "mlp", "hidden_sizes": [128], "num_features": 64, "num_classes": 10},
        "goal": {
            "p99_ms_one_row": GOAL_P99_MS,
            "met_at_concurrency": {str(r["clients"]): r["p99_ms"] <= GOAL_P99_MS for r in one_row},
        },
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'endpoint':<10}{'rows':>6}{'clients':>9}{'requests':>10}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'req/s':>9}"
    ]
    for r in report["results"]:
        lines.append(
            f"{r['endpoint']:<10}{r['rows'] or '-':>6}{r['clients']:>9}{r['requests']:>10}"
            f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['mean_ms']:>9.2f}"
            f"{r['throughput_rps']:>9.0f}"
        )
    goal = report["goal"]
    lines.append(
        f"goal: p99 <= {goal['p99_ms_one_row']:g} ms for 1 row: {goal['met_at_concurrency']}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="Concurrent clients.")
    parser.add_argument("--requests", type=int, default=1600, help="Requests per scenario.")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "predict.json")
    args = parser.parse_args()
    report = run(args.clients, args.requests)
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
