"""Load: 32 concurrent clients mixing submits, polls and downloads against PostgreSQL + Redis.

    python bench/load.py [--seconds 60] [--clients 32] [--load 0.5 | --rate R] [--json PATH]
                         [--api-workers N] [--processes 4] [--arrivals open|per-client]

Two phases of ``--seconds`` each, each against a stack of its own (a fresh database, queue,
API and worker), so the paced phase does not inherit the saturation phase's aftermath:
thousands of jobs still queued for the one worker.

1. **Saturation**: every client sends its next request as soon as the last one answers (a
   closed loop, no think time). This measures the throughput the stack sustains and checks
   that overload yields no 5xx. Its latencies are queueing, not speed: with 32 requests
   always in flight, the mean latency is 32 / throughput (Little's law) whatever the code.
2. **Paced**: requests arrive as a Poisson process whose total rate is ``--load`` (default
   0.5) times the throughput phase 1 measured, in the same run (``--rate R`` skips phase 1
   and paces at R requests/s in all). Each arrival is sent by whichever of the 32 clients is
   free (an open model, like k6's constant-arrival-rate): a slow submit holds one client, not
   the requests scheduled after it. ``--arrivals per-client`` gives each client a Poisson
   stream of its own instead, so a request also waits for its client's previous answer.
   Latency counts from each request's scheduled time, so a server that falls behind (or 32
   busy clients) is charged for the wait (no coordinated omission). The goal, p99 of
   ``GET /v1/jobs/{id}`` ≤ 50 ms, is checked here. ``send lag`` is how late the requests
   went out: the wait for a free client plus the generator's own delay, both included in
   the latencies.

Each request is a submit (20%), a poll (65%: one of the jobs its process submitted, or the
seed job) or a download (15%). Clients run as threads over ``--processes`` generator
processes, each with one keep-alive ``http.client`` connection (less work per request than
httpx: the generator shares the cores it measures), connected and warm before the clock
starts. A separate probe process polls one job 20 times a second (``poll (probe)``): the
latency a lone poller sees, free of the generator's own thread contention. A worker trains
the submitted jobs meanwhile (they are tiny), so the API shares the machine with real
training. The API runs as ``ppml serve --no-worker --workers N`` (``--api-workers``, default
1). Reports every 5xx (the goal is zero) and each request kind's latency.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import multiprocessing
import random
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import postgres_database, print_table, save, stack, summarise

BROKER = "redis://127.0.0.1:6379/0"
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
        "--rate",
        type=float,
        default=None,
        help="Run only the paced phase, at this many requests/s in all (no saturation phase).",
    )
    parser.add_argument(
        "--processes", type=int, default=4, help="Load-generator processes sharing the clients."
    )
    parser.add_argument(
        "--arrivals",
        choices=("open", "per-client"),
        default="open",
        help="Paced phase: one Poisson stream served by whichever client is free (open), or "
        "one stream per client, each waiting for its own previous answer (per-client).",
    )
    args = parser.parse_args()
    phase = functools.partial(_phase, args)
    saturation = None if args.rate else phase(0.0)
    if saturation is None:
        rate = args.rate / args.clients
        share = "a fixed rate"
    else:
        rate = args.load * saturation["requests_per_s"] / args.clients
        share = f"{args.load:.0%} of the saturation throughput"
    paced = phase(rate)
    where = f"(PostgreSQL + Redis, ppml serve --workers {args.api_workers})"
    phases = [
        (
            f"paced: {args.clients} clients, Poisson ({args.arrivals}), "
            f"{rate * args.clients:.0f} requests/s = {share} {where}",
            paced,
        )
    ]
    if saturation is not None:
        title = f"saturation: {args.clients} clients, closed loop, no think time {where}"
        phases.insert(0, (title, saturation))
    for title, result in phases:
        rows = [
            [kind, s["count"], s["p50_ms"], s["p99_ms"], result["errors_5xx"].get(kind, 0)]
            for kind, s in result["latency"].items()
        ]
        cores = ", ".join(f"{role} {share:.2f}" for role, share in result["cpu_cores"].items())
        costs = ", ".join(f"{r} {ms:.2f}" for r, ms in result["cpu_ms_per_request"].items())
        print_table(
            f"{title}: {result['requests_per_s']:.0f} requests/s; CPU ms per request: "
            f"{costs}; cores used: {cores}",
            ["request", "count", "p50 ms", "p99 ms", "5xx"],
            rows,
        )
    errors = sum(sum(result["errors_5xx"].values()) for _, result in phases)
    summary = (
        f"\ntotal 5xx: {errors}; GET /v1/jobs/{{id}} p99 = "
        f"{paced['latency']['poll']['p99_ms']:.1f} ms at {paced['requests_per_s']:.0f} "
        f"requests/s (goal ≤ 50; probe {paced['latency']['poll (probe)']['p99_ms']:.1f} ms, "
        f"send lag {paced['latency']['send lag']['p99_ms']:.1f} ms)"
    )
    if saturation is not None:
        summary += (
            f"; at saturation ({saturation['requests_per_s']:.0f} requests/s) "
            f"{saturation['latency']['poll']['p99_ms']:.1f} ms"
        )
    print(summary)
    save(
        "load",
        {
            "saturation": saturation,
            "paced": {
                **paced,
                "rate_per_client": rate,
                "load": args.load,
                "arrivals": args.arrivals,
            },
            "seconds": args.seconds,
            "clients": args.clients,
            "api_workers": args.api_workers,
            "generator_processes": args.processes,
        },
        args.json,
    )


def _phase(args: argparse.Namespace, rate: float) -> dict[str, Any]:
    """One phase against a stack of its own (database, queue, API, worker)."""
    queue = f"load-{random.randrange(1 << 30)}"
    with (
        tempfile.TemporaryDirectory() as tmp,
        postgres_database() as url,
        _dropped(queue),
        stack(
            Path(tmp),
            database_url=url,
            broker_url=BROKER,
            workers=1,
            api_workers=args.api_workers,
            env={"PPML_WORKER__QUEUE": queue},
        ) as service,
    ):
        headers, seed = _prepare(service)
        return run(
            service,
            headers,
            seed,
            args.seconds,
            args.clients,
            rate,
            args.processes,
            per_client=args.arrivals == "per-client",
        )


@contextmanager
def _dropped(queue: str) -> Iterator[None]:
    """Delete the queue afterwards: the jobs still in it (thousands), and kombu's bindings."""
    try:
        yield
    finally:
        client = redis.Redis.from_url(BROKER)
        try:
            priorities = list(client.scan_iter(match=f"{queue}\x06\x16*"))
            bindings = [f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
            client.delete(queue, *priorities, *bindings)
        finally:
            client.close()


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
    *,
    per_client: bool = False,
) -> dict:
    """One phase. ``rate`` > 0 paces at ``rate`` requests/s per client (Poisson); 0 is a
    closed loop. Each phase has a stack of its own, and submits to the seed job's dataset (its
    budget of ε = 100 is fresh but for the seed's 0.05: a tenant registers the same rows with
    a budget once, docs/privacy.md "Deletion and fingerprints")."""
    with service.client(headers) as client:
        dataset_id = str(client.get(f"/v1/jobs/{seed}").json()["dataset_id"])
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[dict] = ctx.Queue()
    processes = max(1, min(processes, clients))
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    start_at = time.time() + 5.0  # every process starts its clock together
    procs = [
        ctx.Process(
            target=_clients,
            args=(
                *(service.base, headers, dataset_id, seed, i, n),
                *(start_at, seconds, rate, per_client, results),
            ),
        )
        for i, n in enumerate(shares)
    ]
    probe_args = (service.base, headers, f"/v1/jobs/{seed}", start_at, seconds, results)
    procs.append(ctx.Process(target=_probe, args=probe_args))
    cpu: list[dict[str, float]] = []

    def read_cpu() -> None:  # at the start and at the end of the measured window
        for moment in (start_at, start_at + seconds):
            time.sleep(max(0.0, moment - time.time()))
            cpu.append(service.cpu_seconds())

    meter = threading.Thread(target=read_cpu, daemon=True)
    meter.start()
    for proc in procs:
        proc.start()
    parts = [results.get(timeout=seconds + 120) for _ in procs]
    meter.join(timeout=seconds + 10)
    for proc in procs:
        proc.join()
    failures = [failure for part in parts for failure in part.get("failures", [])]
    if failures:
        raise RuntimeError(f"{len(failures)} load clients failed, first: {failures[0]}")
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
    requests = sum(len(v) for k, v in latencies.items() if k not in ("poll (probe)", "send lag"))
    used = {role: cpu[1][role] - cpu[0][role] for role in cpu[0]} if len(cpu) == 2 else {}
    return {
        # CPU the API spent per request served in the window (the machine's other load
        # disturbs it far less than throughput), and each process's share of a core
        "api_cpu_ms_per_request": round(1000 * used.get("api", 0.0) / max(requests, 1), 3),
        "cpu_ms_per_request": {
            role: round(1000 * spent / max(requests, 1), 3) for role, spent in used.items()
        },
        "cpu_cores": {role: round(spent / seconds, 3) for role, spent in used.items()},
        "latency": {kind: summarise(values) for kind, values in latencies.items()},
        "errors_5xx": dict(errors),
        "statuses": {kind: dict(codes) for kind, codes in statuses.items()},
        "jobs_submitted": submitted,
        "requests_per_s": requests / seconds,
    }


class _Http:
    """A keep-alive HTTP/1.1 connection over the standard library's ``http.client``.

    The generator shares the machine's cores with the stack it measures, so its own cost per
    request is kept small: ``http.client`` does less per request than httpx, which leaves
    that CPU to the server and shortens the wait of a client thread for its process's GIL
    (time counted as latency).
    """

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        url = urllib.parse.urlsplit(base)
        self._conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
        self._headers = {**headers, "Accept": "*/*"}

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Answer:
        headers = self._headers
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers = {**headers, "Content-Type": "application/json"}
        self._conn.request(method, path, body=payload, headers=headers)
        response = self._conn.getresponse()
        return Answer(response.status, response.read())

    def close(self) -> None:
        self._conn.close()


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _Arrivals:
    """Poisson arrivals at ``rate``/s from ``start`` to ``stop``, handed out in order.

    Shared by a process's client threads (the open model), each takes the next arrival when
    it is free; or one per client (``--arrivals per-client``).
    """

    def __init__(self, rate: float, start: float, stop: float, rng: random.Random) -> None:
        self._rate, self._at, self._stop, self._rng = rate, start, stop, rng
        self._lock = threading.Lock()

    def next(self) -> float | None:
        with self._lock:
            self._at += self._rng.expovariate(self._rate)
            return self._at if self._at < self._stop else None


class _ClosedLoop:
    """The closed loop's schedule: every request is due as soon as a client asks, until
    ``stop``."""

    def __init__(self, stop: float) -> None:
        self._stop = stop

    def next(self) -> float | None:
        now = time.monotonic()
        return now if now < self._stop else None


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
    per_client: bool,
    out: multiprocessing.Queue[dict],
) -> None:
    """``clients`` threads in this process; each picks submit 20%, poll 65%, download 15%.

    Closed loop (``rate`` 0): the next request goes as soon as the answer is in. Paced: the
    process's requests arrive as a Poisson process of ``rate`` × ``clients``/s, each sent by
    the next free client (open model), or each client's own Poisson process of ``rate``/s
    (``per_client``). Latency counts from the scheduled time, so a server that falls behind
    is charged for the wait (no coordinated omission). ``send lag`` is how late the requests
    went out.
    """
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    lock = threading.Lock()
    job_ids = [seed]
    ready = threading.Barrier(clients + 1, timeout=120)  # a client that dies breaks it
    clock: list[float] = []
    shared: list[_Arrivals | _ClosedLoop] = []  # the process's schedule, once the clock starts
    failures: list[str] = []

    def client(number: int) -> None:
        try:
            run_client(number)
        except Exception as exc:  # reported by the parent: a dead client must fail the run
            failures.append(f"client {index}.{number}: {exc!r}")
            raise

    def run_client(number: int) -> None:
        rng = random.Random(index * 1000 + number)
        http = _Http(base, headers)
        try:
            # Connected and warm before the clock starts: set-up is not the server's latency.
            if http.request("GET", "/healthz").status != 200:
                raise RuntimeError("the API is not healthy")
            ready.wait()
            arrivals = shared[0]
            if rate and per_client:
                arrivals = _Arrivals(rate, clock[0], clock[0] + seconds, rng)
            while (next_at := arrivals.next()) is not None:
                if (delay := next_at - time.monotonic()) > 0:
                    time.sleep(delay)
                roll = rng.random()
                if roll < 0.2:
                    kind, method, path = "submit", "POST", "/v1/jobs"
                    body: dict[str, Any] | None = {**JOB, "dataset_id": dataset_id}
                elif roll < 0.85:
                    kind, method, path = "poll", "GET", f"/v1/jobs/{rng.choice(job_ids)}"
                    body = None
                else:
                    kind, method, path = "download", "GET", f"/v1/jobs/{seed}/model"
                    body = None
                sent = time.monotonic()
                answer = http.request(method, path, body)
                done = time.monotonic()
                with lock:
                    latencies[kind].append(done - next_at)
                    if rate:
                        latencies["send lag"].append(sent - next_at)
                    statuses[kind][answer.status] += 1
                    if kind == "submit" and answer.status == 202:
                        job_ids.append(answer.json()["id"])
        finally:
            http.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, start_at - time.time()))
    clock.append(time.monotonic())
    stop_at = clock[0] + seconds
    if rate:
        shared.append(_Arrivals(rate * clients, clock[0], stop_at, random.Random(-1 - index)))
    else:
        shared.append(_ClosedLoop(stop_at))
    ready.wait()
    for thread in threads:
        thread.join()
    out.put(
        {
            "failures": failures,
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
    latencies = []
    time.sleep(max(0.0, start_at - time.time()))
    http = _Http(base, headers)
    try:
        next_at = time.monotonic()
        stop_at = next_at + seconds
        while next_at < stop_at:
            time.sleep(max(0.0, next_at - time.monotonic()))
            started = time.monotonic()
            if http.request("GET", path).status != 200:
                raise RuntimeError(f"the probe's poll of {path} failed")
            latencies.append(time.monotonic() - started)
            next_at += 0.05
    finally:
        http.close()
    out.put({"latencies": {"poll (probe)": latencies}, "statuses": {}, "submitted": 0})


if __name__ == "__main__":
    main()
