"""End to end through the service: a DP job and its non-private twin, same run, interleaved.

    python bench/dp_service.py [--pairs 3] [--epochs 60] [--json PATH]

MNIST-1D (built-in), MLP 256-256, batch 256. Both jobs go through ``POST /v1/jobs`` to a real
``ppml worker`` (embedded SQLite + filesystem broker); the time of a job is its
``finished_at - started_at`` as recorded by the worker. Issue goal: DP ≤ 1.5× non-private.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table, save, stack


def _spec(dataset_id: str, epochs: int, private: bool) -> dict[str, Any]:
    return {
        "name": "dp" if private else "plain",
        "dataset_id": dataset_id,
        "model": {"arch": "mlp", "hidden_sizes": [256, 256]},
        "training": {"epochs": epochs, "batch_size": 256, "learning_rate": 0.5, "seed": 0},
        "privacy": {"target_epsilon": 8.0, "delta": 1e-5} if private else None,
    }


def _run(client: Any, spec: dict[str, Any]) -> float:
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    started = datetime.fromisoformat(job["started_at"])
    return (datetime.fromisoformat(job["finished_at"]) - started).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--torch-threads", type=int, default=None, help="per worker")
    args = parser.parse_args()
    plain, private = [], []
    with (
        tempfile.TemporaryDirectory() as tmp,
        stack(
            Path(tmp),
            database_url=None,
            broker_url="filesystem://",
            workers=1,
            env={"PPML_WORKER__TORCH_THREADS": str(args.torch_threads)}
            if args.torch_threads
            else None,
        ) as service,
        service.client(service.tenant()) as client,
    ):
        body = {"name": "m", "source": {"builtin": "mnist1d"}, "privacy_budget": None}
        public = client.post("/v1/datasets", json=body).json()["id"]
        budget = {"epsilon": 100.0, "delta": 1e-5}
        secret = client.post("/v1/datasets", json={**body, "privacy_budget": budget}).json()["id"]
        _run(client, _spec(public, 1, False))  # warm-up
        for _ in range(args.pairs):
            plain.append(_run(client, _spec(public, args.epochs, False)))
            private.append(_run(client, _spec(secret, args.epochs, True)))
    ratios = [p / q for p, q in zip(private, plain, strict=True)]
    rows = [
        [i + 1, q, p, r] for i, (q, p, r) in enumerate(zip(plain, private, ratios, strict=True))
    ]
    print_table(
        "DP job vs non-private twin through the service (seconds)",
        ["pair", "non-private s", "DP s", "ratio"],
        rows,
    )
    median = statistics.median(ratios)
    print(f"\nmedian ratio {median:.2f} (goal ≤ 1.5)")
    save(
        "dp_service",
        {
            "plain_s": plain,
            "private_s": private,
            "ratios": ratios,
            "median_ratio": median,
            "epochs": args.epochs,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
