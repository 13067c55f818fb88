"""What request telemetry adds to each request: the middleware alone, timed around an ASGI app
that answers at once, in single-process and multiprocess (``PROMETHEUS_MULTIPROC_DIR``) modes.

    python bench/telemetry.py [--requests 50000] [--json PATH]

Each mode runs in a child process (``prometheus_client`` picks its storage at import). The
figure is the extra time per request over the same app without the middleware; the scrape row
times one ``/metrics`` rendering of the samples that run left (no database: the gauges read at
scrape are stubbed with constants).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import print_table, save


def _measure(requests: int) -> dict[str, float]:
    from api.observe import RequestTelemetry
    from ppml.telemetry import ServiceCollector, scrape

    class Route:
        path = "/v1/jobs/{job_id}"

    async def app(scope: Any, _receive: Any, send: Any) -> None:
        scope["route"] = Route
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(_message: Any) -> None:
        return None

    def scope() -> dict[str, Any]:
        headers = [(b"authorization", b"Bearer x")]
        return {"type": "http", "method": "GET", "path": "/v1/jobs/job_1", "headers": headers}

    async def run(handler: Any) -> float:
        for _ in range(1000):  # warm up
            await handler(scope(), receive, send)
        started = time.perf_counter()
        for _ in range(requests):
            await handler(scope(), receive, send)
        return (time.perf_counter() - started) / requests

    bare = asyncio.run(run(app))
    wrapped = asyncio.run(run(RequestTelemetry(app)))
    collector = ServiceCollector(lambda: ({"queued": 3, "running": 1}, {}), lambda: 0)
    started = time.perf_counter()
    size = len(scrape(collector))
    return {
        "bare_us": bare * 1e6,
        "with_telemetry_us": wrapped * 1e6,
        "added_us": (wrapped - bare) * 1e6,
        "scrape_ms": (time.perf_counter() - started) * 1e3,
        "scrape_bytes": float(size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.requests)))
        return
    results = {}
    for mode in ("single-process", "multiprocess"):
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with tempfile.TemporaryDirectory() as folder:
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = folder
            command = [sys.executable, __file__, "--child", "--requests", str(args.requests)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [
        [mode, r["bare_us"], r["with_telemetry_us"], r["added_us"], r["scrape_ms"]]
        for mode, r in results.items()
    ]
    header = ["mode", "bare µs/req", "with telemetry µs/req", "added µs/req", "scrape ms"]
    print_table(f"request telemetry, {args.requests} requests", header, rows)
    save("telemetry", {"requests": args.requests, "modes": results}, args.json)


if __name__ == "__main__":
    main()
