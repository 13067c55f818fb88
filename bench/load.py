"""Load: 32 concurrent clients mixing submits, polls and downloads against PostgreSQL + Redis.

    python bench/load.py [--seconds 60] [--clients 32] [--json PATH] [--api-workers N]

Reports every 5xx (the goal is zero) and the latency of each request kind; the goal for the
p99 of ``GET /v1/jobs/{id}`` is 50 ms. Besides the 32 clients' own polls, a separate probe
process polls one job 20 times a second (``poll (probe)``): the latency a poller sees under
this load, without the load generator's own thread contention in its clock. A worker trains
the submitted jobs meanwhile (they are tiny), so the API shares the machine with real
training, as in production. The API runs as
``ppml serve --no-worker --workers N`` (``--api-workers``, default 1).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import postgres_database, print_table, save, stack, summarise

JOB = {
    "name": "load",
    "model": {"arch": "logreg"},
    "training": {"epochs": 1, "batch_size": 256, "learning_rate": 0.5},
    "privacy": {"target_epsilon": 0.05, "delta": 1e-6},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--api-workers", type=int, default=1, help="API processes (ppml serve --workers)."
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, postgres_database() as url:
        queue = f"load-{random.randrange(1 << 30)}"
        with stack(
            Path(tmp),
            database_url=url,
            broker_url="redis://127.0.0.1:6379/0",
            workers=1,
            api_workers=args.api_workers,
            env={"PPML_WORKER__QUEUE": queue},
        ) as service:
            result = run(service, args.seconds, args.clients)
    rows = [
        [kind, s["count"], s["p50_ms"], s["p99_ms"], result["errors_5xx"].get(kind, 0)]
        for kind, s in result["latency"].items()
    ]
    print_table(
        f"load: {args.clients} clients for {args.seconds:.0f} s (PostgreSQL + Redis), "
        f"ppml serve --workers {args.api_workers}",
        ["request", "count", "p50 ms", "p99 ms", "5xx"],
        rows,
    )
    print(
        f"\ntotal 5xx: {sum(result['errors_5xx'].values())}; "
        f"GET /v1/jobs/{{id}} p99 = {result['latency']['poll']['p99_ms']:.1f} ms "
        f"(probe: {result['latency']['poll (probe)']['p99_ms']:.1f} ms; goal ≤ 50)"
    )
    save(
        "load",
        {
            **result,
            "seconds": args.seconds,
            "clients": args.clients,
            "api_workers": args.api_workers,
        },
        args.json,
    )


def run(service, seconds: float, clients: int) -> dict:  # type: ignore[no-untyped-def]
    headers = service.tenant()
    with service.client(headers) as client:
        body = {
            "name": "d",
            "source": {"builtin": "digits"},
            "privacy_budget": {"epsilon": 100.0, "delta": 1e-6},
        }
        dataset_id = client.post("/v1/datasets", json=body).json()["id"]
        seed = client.post("/v1/jobs", json={**JOB, "dataset_id": dataset_id}).json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{seed}").json()["status"] != "succeeded":
            if time.monotonic() > deadline:
                raise RuntimeError("the seed job did not finish")
            time.sleep(0.5)
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    statuses: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    lock = threading.Lock()
    job_ids = [seed]
    stop_at = time.monotonic() + seconds

    def worker(index: int) -> None:
        rng = random.Random(index)
        with service.client(headers) as http:
            while time.monotonic() < stop_at:
                roll = rng.random()
                if roll < 0.2:
                    kind, call = (
                        "submit",
                        lambda: http.post("/v1/jobs", json={**JOB, "dataset_id": dataset_id}),
                    )
                elif roll < 0.85:
                    path = f"/v1/jobs/{rng.choice(job_ids)}"
                    kind, call = "poll", lambda path=path: http.get(path)
                else:
                    kind, call = "download", lambda: http.get(f"/v1/jobs/{seed}/model")
                started = time.perf_counter()
                response = call()
                elapsed = time.perf_counter() - started
                with lock:
                    latencies[kind].append(elapsed)
                    statuses[kind][response.status_code] += 1
                    if response.status_code >= 500:
                        errors[kind] += 1
                    if kind == "submit" and response.status_code == 202:
                        job_ids.append(response.json()["id"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    probe_results: multiprocessing.Queue[list[float]] = multiprocessing.get_context("spawn").Queue()
    probe = multiprocessing.get_context("spawn").Process(
        target=_probe, args=(service.base, headers, f"/v1/jobs/{seed}", seconds, probe_results)
    )
    probe.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies["poll (probe)"] = probe_results.get(timeout=60)
    probe.join()
    return {
        "latency": {kind: summarise(values) for kind, values in latencies.items()},
        "errors_5xx": dict(errors),
        "statuses": {kind: dict(codes) for kind, codes in statuses.items()},
        "jobs_submitted": len(job_ids) - 1,
    }


def _probe(
    base: str,
    headers: dict[str, str],
    path: str,
    seconds: float,
    out: multiprocessing.Queue[list[float]],
) -> None:
    """Poll ``path`` at 20 Hz (open loop) in a process of its own; send back the latencies."""
    import httpx

    latencies = []
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        next_at = time.monotonic()
        stop_at = next_at + seconds
        while next_at < stop_at:
            time.sleep(max(0.0, next_at - time.monotonic()))
            started = time.perf_counter()
            http.get(path).raise_for_status()
            latencies.append(time.perf_counter() - started)
            next_at += 0.05
    out.put(latencies)


if __name__ == "__main__":
    main()
