"""Load: 32 concurrent clients mixing submits, polls and downloads against PostgreSQL + Redis.

    python bench/load.py [--seconds 60] [--clients 32] [--load 0.5] [--json PATH]
                         [--api-workers N] [--processes 4]

Two phases of ``--seconds`` each, against the same stack:

1. **Saturation**: every client sends its next request as soon as the last one answers (a
   closed loop, no think time). This measures the throughput the stack sustains and checks
   that overload yields no 5xx. Its latencies are queueing, not speed: with 32 requests
   always in flight, the mean latency is 32 / throughput (Little's law) whatever the code.
2. **Paced**: the same 32 clients send Poisson-timed requests whose total rate is
   ``--load`` (default 0.5) times the throughput phase 1 measured, in the same run.
   Latency counts from each request's scheduled time, so a server that falls behind is
   charged for the wait (no coordinated omission). The goal, p99 of ``GET /v1/jobs/{id}``
   ≤ 50 ms, is checked here.

Each client picks submit 20%, poll 65% (one of the jobs its process submitted, or the seed
job), download 15%. Clients run as threads over ``--processes`` generator processes,
connected and warm before the clock starts. A separate probe process polls one job 20 times
a second (``poll (probe)``): the latency a lone poller sees, free of the generator's own
thread contention. A worker trains the submitted jobs meanwhile (they are tiny), so the API
shares the machine with real training. The API runs as ``ppml serve --no-worker --workers
N`` (``--api-workers``, default 1). Reports every 5xx (the goal is zero) and each request
kind's latency.
"""

from __future__ import annotations

import argparse
import functools
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
    parser.add_argument("--seconds", type=float, default=60, help="Length of each phase.")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--api-workers", type=int, default=1, help="API processes (ppml serve --workers)."
    )
    parser.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="Offered load of the paced phase, as a fraction of the saturation throughput.",
    )
    parser.add_argument(
        "--processes", type=int, default=4, help="Load-generator processes sharing the clients."
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
            headers, seed = _prepare(service)
            phase = functools.partial(run, service, headers, seed, args.seconds, args.clients)
            saturation = phase(0.0, args.processes)
            capacity = saturation["requests_per_s"]
            rate = args.load * capacity / args.clients
            paced = phase(rate, args.processes)
    where = f"(PostgreSQL + Redis, ppml serve --workers {args.api_workers})"
    for title, result in (
        (f"saturation: {args.clients} clients, closed loop, no think time {where}", saturation),
        (
            f"paced: {args.clients} clients, Poisson, {rate:.2f} requests/s each "
            f"= {args.load:.0%} of the saturation throughput {where}",
            paced,
        ),
    ):
        rows = [
            [kind, s["count"], s["p50_ms"], s["p99_ms"], result["errors_5xx"].get(kind, 0)]
            for kind, s in result["latency"].items()
        ]
        print_table(
            f"{title}: {result['requests_per_s']:.0f} requests/s",
            ["request", "count", "p50 ms", "p99 ms", "5xx"],
            rows,
        )
    errors = sum(saturation["errors_5xx"].values()) + sum(paced["errors_5xx"].values())
    print(
        f"\ntotal 5xx: {errors}; GET /v1/jobs/{{id}} p99 = "
        f"{paced['latency']['poll']['p99_ms']:.1f} ms at {paced['requests_per_s']:.0f} "
        f"requests/s (goal ≤ 50; probe {paced['latency']['poll (probe)']['p99_ms']:.1f} ms); "
        f"at saturation ({capacity:.0f} requests/s) "
        f"{saturation['latency']['poll']['p99_ms']:.1f} ms"
    )
    save(
        "load",
        {
            "saturation": saturation,
            "paced": {**paced, "rate_per_client": rate, "load": args.load},
            "seconds": args.seconds,
            "clients": args.clients,
            "api_workers": args.api_workers,
            "generator_processes": args.processes,
        },
        args.json,
    )


def _prepare(service) -> tuple[dict[str, str], str]:  # type: ignore[no-untyped-def]
    """A tenant, and one finished job whose model the clients download."""
    headers = service.tenant()
    with service.client(headers) as client:
        dataset_id = _dataset(client)
        seed = client.post("/v1/jobs", json={**JOB, "dataset_id": dataset_id}).json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{seed}").json()["status"] != "succeeded":
            if time.monotonic() > deadline:
                raise RuntimeError("the seed job did not finish")
            time.sleep(0.5)
    return headers, str(seed)


def _dataset(client) -> str:  # type: ignore[no-untyped-def]
    body = {
        "name": "d",
        "source": {"builtin": "digits"},
        "privacy_budget": {"epsilon": 100.0, "delta": 1e-6},
    }
    return str(client.post("/v1/datasets", json=body).json()["id"])


def run(  # type: ignore[no-untyped-def]
    service,
    headers: dict[str, str],
    seed: str,
    seconds: float,
    clients: int,
    rate: float,
    processes: int,
) -> dict:
    """One phase. ``rate`` > 0 paces each client at ``rate`` requests/s (Poisson); 0 is a
    closed loop. Each phase submits to a dataset of its own (a fresh budget)."""
    with service.client(headers) as client:
        dataset_id = _dataset(client)
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[dict] = ctx.Queue()
    processes = max(1, min(processes, clients))
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    start_at = time.time() + 5.0  # every process starts its clock together
    procs = [
        ctx.Process(
            target=_clients,
            args=(service.base, headers, dataset_id, seed, i, n, start_at, seconds, rate, results),
        )
        for i, n in enumerate(shares)
    ]
    probe_args = (service.base, headers, f"/v1/jobs/{seed}", start_at, seconds, results)
    procs.append(ctx.Process(target=_probe, args=probe_args))
    for proc in procs:
        proc.start()
    parts = [results.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join()
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    statuses: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    submitted = 0
    for part in parts:
        for kind, values in part["latencies"].items():
            latencies[kind] += values
        for kind, codes in part["statuses"].items():
            for code, count in codes.items():
                statuses[kind][str(code)] += count
                if int(code) >= 500:
                    errors[kind] += count
        submitted += part["submitted"]
    requests = sum(len(v) for k, v in latencies.items() if k != "poll (probe)")
    return {
        "latency": {kind: summarise(values) for kind, values in latencies.items()},
        "errors_5xx": dict(errors),
        "statuses": {kind: dict(codes) for kind, codes in statuses.items()},
        "jobs_submitted": submitted,
        "requests_per_s": requests / seconds,
    }


def _clients(
    base: str,
    headers: dict[str, str],
    dataset_id: str,
    seed: str,
    index: int,
    clients: int,
    start_at: float,
    seconds: float,
    rate: float,
    out: multiprocessing.Queue[dict],
) -> None:
    """``clients`` threads in this process; each picks submit 20%, poll 65%, download 15%.

    Closed loop (``rate`` 0): the next request goes as soon as the answer is in. Paced: a
    client's requests are scheduled as a Poisson process of ``rate``/s, and latency counts
    from the scheduled time, so a server that falls behind is charged for the wait
    (no coordinated omission).
    """
    import httpx

    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    lock = threading.Lock()
    job_ids = [seed]
    ready = threading.Barrier(clients + 1)
    clock: list[float] = []

    def client(number: int) -> None:
        rng = random.Random(index * 1000 + number)
        with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
            # Connected and warm before the clock starts: set-up is not the server's latency.
            http.get("/healthz").raise_for_status()
            ready.wait()
            stop_at = clock[0] + seconds
            next_at = clock[0] + (rng.expovariate(rate) if rate else 0.0)
            while next_at < stop_at:
                if rate:
                    time.sleep(max(0.0, next_at - time.monotonic()))
                roll = rng.random()
                if roll < 0.2:
                    kind = "submit"
                    job = {**JOB, "dataset_id": dataset_id}
                    call = functools.partial(http.post, "/v1/jobs", json=job)
                elif roll < 0.85:
                    kind = "poll"
                    call = functools.partial(http.get, f"/v1/jobs/{rng.choice(job_ids)}")
                else:
                    kind = "download"
                    call = functools.partial(http.get, f"/v1/jobs/{seed}/model")
                started = next_at if rate else time.monotonic()
                response = call()
                done = time.monotonic()
                with lock:
                    latencies[kind].append(done - started)
                    statuses[kind][response.status_code] += 1
                    if kind == "submit" and response.status_code == 202:
                        job_ids.append(response.json()["id"])
                next_at = next_at + rng.expovariate(rate) if rate else done

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, start_at - time.time()))
    clock.append(time.monotonic())
    ready.wait()
    for thread in threads:
        thread.join()
    out.put(
        {
            "latencies": dict(latencies),
            "statuses": {kind: dict(codes) for kind, codes in statuses.items()},
            "submitted": len(job_ids) - 1,
        }
    )


def _probe(
    base: str,
    headers: dict[str, str],
    path: str,
    start_at: float,
    seconds: float,
    out: multiprocessing.Queue[dict],
) -> None:
    """Poll ``path`` at 20 Hz (open loop) in a process of its own; send back the latencies."""
    import httpx

    latencies = []
    time.sleep(max(0.0, start_at - time.time()))
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        next_at = time.monotonic()
        stop_at = next_at + seconds
        while next_at < stop_at:
            time.sleep(max(0.0, next_at - time.monotonic()))
            started = time.monotonic()
            http.get(path).raise_for_status()
            latencies.append(time.monotonic() - started)
            next_at += 0.05
    out.put({"latencies": {"poll (probe)": latencies}, "statuses": {}, "submitted": 0})


if __name__ == "__main__":
    main()
