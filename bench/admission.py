"""Admission throughput: concurrent clients submitting jobs against one dataset's budget.

    python bench/admission.py [--seconds 10] [--clients 32] [--json PATH]
                              [--backend postgres|sqlite|both] [--api-workers N]

For each backend (a fresh PostgreSQL database, and SQLite) it starts ``ppml serve --no-worker
--workers N`` (``N`` API processes, default 1; broker ``memory://``, so nothing is trained),
then runs three phases of ``--seconds`` each
with ``--clients`` threads, each with its own keep-alive HTTP client:

* ``healthz``: ``GET /healthz``, the ceiling of this server and client on this machine;
* ``admit``: ``POST /v1/jobs`` (ε = 0.05) on a dataset with ε = 100, δ = 1e-5: every job
  fits, so every request takes the budget lock, reserves and enqueues;
* ``refuse``: the same request on a dataset whose budget is spent: every answer is a 409.

The goal is ≥ 200 admissions/s on PostgreSQL. Results go to ``bench/results/admission.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Service, postgres_database, print_table, save, stack, summarise

DELTA = 1e-5
JOB: dict[str, Any] = {
    "name": "admission",
    "model": {"arch": "logreg"},
    "training": {"epochs": 1, "batch_size": 256, "learning_rate": 0.5},
    "privacy": {"target_epsilon": 0.05, "delta": DELTA},
}
GOAL_PER_S = 200


def hammer(
    service: Service,
    headers: dict[str, str],
    request: Callable[[httpx.Client], httpx.Response],
    *,
    seconds: float,
    clients: int,
) -> dict[str, Any]:
    """``clients`` threads send ``request`` in a loop for ``seconds``; counts and latencies."""
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client_loop() -> None:
        with service.client(headers) as http:
            request(http)  # open the connection before the clock starts
            ready.wait()
            mine: list[tuple[int, float]] = []
            while time.monotonic() < stop_at[0]:
                started = time.perf_counter()
                code = request(http).status_code
                mine.append((code, time.perf_counter() - started))
        with lock:
            statuses.update(code for code, _ in mine)
            latencies.extend(elapsed for _, elapsed in mine)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.monotonic() + seconds + 60  # provisional, while clients connect
    ready.wait()
    began = time.monotonic()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    return {
        "seconds": elapsed,
        "requests": len(latencies),
        "per_s": len(latencies) / elapsed,
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "latency": summarise(latencies),
    }


def new_dataset(http: httpx.Client, epsilon: float) -> str:
    body = {
        "name": "bench",
        "source": {"builtin": "digits"},
        "privacy_budget": {"epsilon": epsilon, "delta": DELTA},
    }
    response = http.post("/v1/datasets", json=body)
    response.raise_for_status()
    return str(response.json()["id"])


def spend_all(http: httpx.Client, dataset_id: str) -> None:
    """Fill a budget with ever smaller jobs until even the benchmark's job is refused."""
    for target in (0.5, 0.2, JOB["privacy"]["target_epsilon"]):
        job = {
            **JOB,
            "dataset_id": dataset_id,
            "privacy": {**JOB["privacy"], "target_epsilon": target},
        }
        for _ in range(1000):
            code = http.post("/v1/jobs", json=job).status_code
            if code == 409:
                break
            assert code == 202, code


def run_backend(
    name: str,
    database: AbstractContextManager[str | None],
    seconds: float,
    clients: int,
    api_workers: int,
) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        database as url,
        stack(Path(tmp), database_url=url, api_workers=api_workers) as service,
    ):
        # Two tenants: a tenant registers the same rows (digits) with a budget only once.
        headers, spender = service.tenant(), service.tenant()
        with service.client(headers) as http:
            roomy = new_dataset(http, 100.0)
            # σ is calibrated once per job shape; price it before the clock starts
            assert http.post("/v1/jobs", json={**JOB, "dataset_id": roomy}).status_code == 202
        with service.client(spender) as http:
            spent = new_dataset(http, 1.0)
            spend_all(http, spent)

        phases: dict[str, tuple[dict[str, str], Callable[[httpx.Client], httpx.Response]]] = {
            "healthz": (headers, lambda h: h.get("/healthz")),
            "admit": (headers, lambda h: h.post("/v1/jobs", json={**JOB, "dataset_id": roomy})),
            "refuse": (spender, lambda h: h.post("/v1/jobs", json={**JOB, "dataset_id": spent})),
        }
        results = {
            phase: hammer(service, who, call, seconds=seconds, clients=clients)
            for phase, (who, call) in phases.items()
        }
        with service.client(headers) as http:
            budget = http.get(f"/v1/datasets/{roomy}").json().get("privacy_budget")
    return {"backend": name, "phases": results, "budget_after": budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--backend", choices=["postgres", "sqlite", "both"], default="both")
    parser.add_argument(
        "--api-workers", type=int, default=1, help="API processes (ppml serve --workers)."
    )
    args = parser.parse_args()
    backends: list[tuple[str, AbstractContextManager[str | None]]] = []
    if args.backend in ("postgres", "both"):
        backends.append(("postgres", postgres_database()))
    if args.backend in ("sqlite", "both"):
        backends.append(("sqlite", nullcontext(None)))
    runs = [
        run_backend(name, db, args.seconds, args.clients, args.api_workers) for name, db in backends
    ]

    rows = []
    for run in runs:
        for phase, r in run["phases"].items():
            expected = {"healthz": "200", "admit": "202", "refuse": "409"}[phase]
            good = r["statuses"].get(expected, 0) / r["seconds"]
            other = {k: v for k, v in r["statuses"].items() if k != expected}
            rows.append(
                [
                    run["backend"],
                    phase,
                    round(good, 1),
                    r["latency"]["p50_ms"],
                    r["latency"]["p99_ms"],
                    ", ".join(f"{k}: {v}" for k, v in other.items()) or "-",
                ]
            )
    print_table(
        f"admission: {args.clients} clients, {args.seconds:.0f} s per phase, "
        f"ppml serve --workers {args.api_workers}",
        ["backend", "phase", "ok/s", "p50 ms", "p99 ms", "other statuses"],
        rows,
    )
    for run in runs:
        admitted = (
            run["phases"]["admit"]["statuses"].get("202", 0) / run["phases"]["admit"]["seconds"]
        )
        ceiling = run["phases"]["healthz"]["per_s"]
        print(
            f"{run['backend']}: {admitted:.0f} admissions/s "
            f"({admitted / ceiling:.0%} of the /healthz ceiling, {ceiling:.0f}/s)"
            + (f"; goal ≥ {GOAL_PER_S}/s" if run["backend"] == "postgres" else "")
        )
    save(
        "admission",
        {
            "seconds": args.seconds,
            "clients": args.clients,
            "api_workers": args.api_workers,
            "runs": runs,
            "goal_per_s": GOAL_PER_S,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
