"""One federated round (vectorised and loop) against a centralised epoch on the same rows.

Every client holds 50 rows of MNIST-1D-shaped synthetic data (40 features, 10 classes)
and trains the MLP 40-256-256-10 for one local epoch at batch 10 (5 steps); the
centralised run trains the same MLP for one epoch over all ``clients × 50`` rows at batch
10, i.e. the same number of optimizer steps over the same samples. Each timing is a
whole public call (``train_federated`` with one round, ``train`` with one epoch), with a
100-row test set. Every variant runs once untimed first (allocator, torch.func and
MKL warm-up); then the variants are interleaved within each repeat, in a rotating order,
after a ``gc.collect()``, and a ratio is the median over repeats of ``variant /
centralised`` from the same repeat, so load from other processes hits both sides alike
(the table also gives the smallest and largest per-repeat ratio). All variants run in
one process with the same ``torch.set_num_threads``.

Usage::

    .venv/bin/python bench/federated_round.py [--device cuda] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppml.specs import ModelSpec
from ppml.training import TrainingPlan, train
from ppml.training.federated import FederatedPlan, train_federated

ROWS_PER_CLIENT, FEATURES, CLASSES, BATCH, HIDDEN = 50, 40, 10, 10, (256, 256)


def _data(clients: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = clients * ROWS_PER_CLIENT
    x = rng.normal(size=(n + 100, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, n + 100).astype(np.int64)
    return {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:]}


def _plan(n: int) -> TrainingPlan:
    steps = math.ceil(n / BATCH)
    return TrainingPlan(
        model=ModelSpec(arch="mlp", hidden_sizes=list(HIDDEN)),
        epochs=1,
        batch_size=BATCH,
        learning_rate=0.05,
        optimizer="sgd",
        seed=0,
        steps_per_epoch=steps,
        total_steps=steps,
    )


def _variants(
    clients: int, device: str, chunk_sizes: list[int | None]
) -> dict[str, Callable[[], Any]]:
    data = _data(clients)
    plan = _plan(clients * ROWS_PER_CLIENT)

    def federated(vectorized: bool, chunk_size: int | None = None) -> Callable[[], Any]:
        fed = FederatedPlan(
            num_clients=clients,
            clients_per_round=clients,
            rounds=1,
            local_epochs=1,
            partition="column",  # exactly ROWS_PER_CLIENT rows each (keyed iid varies)
            alpha=1.0,
            strategy="fedavg",
            mu=0.0,
            server_learning_rate=1.0,
            dropout=0.0,
            vectorized=vectorized,
            chunk_size=chunk_size,
        )
        return lambda: train_federated(
            **data,
            num_classes=CLASSES,
            clients_train=np.arange(clients * ROWS_PER_CLIENT, dtype=np.int64) % clients,
            plan=plan,
            fed=fed,
            dp=None,
            device=device,
        )

    variants = {
        "centralised": lambda: train(
            **data, num_classes=CLASSES, plan=plan, dp=None, device=device
        ),
    }
    for chunk_size in chunk_sizes:
        variants[f"vectorised/{chunk_size or 'auto'}"] = federated(True, chunk_size)
    variants["loop"] = federated(False)
    return variants


def _timed(fn: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_size(
    clients: int, *, device: str, repeats: int, chunk_sizes: list[int | None], skip: set[str]
) -> dict[str, Any]:
    """Times the variants for one client count; returns medians and ratios."""
    variants = _variants(clients, device, chunk_sizes)
    variants = {k: v for k, v in variants.items() if k not in skip}
    for fn in variants.values():  # warm-up: first-call costs (allocations, torch.func)
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            gc.collect()
            times[name].append(_timed(variants[name], device))
    per_repeat = {
        name: [t / c for t, c in zip(times[name], times["centralised"], strict=True)]
        for name in names
    }
    return {
        "clients": clients,
        "rows": clients * ROWS_PER_CLIENT,
        "steps": clients * math.ceil(ROWS_PER_CLIENT / BATCH),
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "ratio_vs_centralised_epoch": {n: statistics.median(r) for n, r in per_repeat.items()},
        "ratio_range": {n: [min(r), max(r)] for n, r in per_repeat.items()},
        "times_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--chunk-sizes",
        nargs="+",
        default=["auto", "100"],
        help="clients per vectorised chunk, one variant each ('auto': the library default)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("bench/results/federated_round.json"))
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    # set explicitly, so the count in the report is the one every variant ran with
    torch.set_num_threads(args.threads or torch.get_num_threads())
    skip = {"loop"} if args.skip_loop else set()
    chunk_sizes = [None if c == "auto" else int(c) for c in args.chunk_sizes]
    results = []
    print(f"device {args.device}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"{'clients':>8} {'variant':>16} {'median s':>10} {'× central':>10} {'range':>12}")
    for clients in args.clients:
        result = bench_size(
            clients,
            device=args.device,
            repeats=args.repeats,
            chunk_sizes=chunk_sizes,
            skip=skip,
        )
        for name, seconds in result["median_s"].items():
            ratio = result["ratio_vs_centralised_epoch"][name]
            low, high = result["ratio_range"][name]
            spread = f"{low:.2f}-{high:.2f}"
            print(f"{clients:>8} {name:>16} {seconds:>10.3f} {ratio:>10.2f} {spread:>12}")
        results.append(result)
    report = {
        "benchmark": "federated_round",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": f"mlp {FEATURES}-{'-'.join(map(str, HIDDEN))}-{CLASSES}",
        "batch_size": BATCH,
        "rows_per_client": ROWS_PER_CLIENT,
        "chunk_sizes": args.chunk_sizes,
        "repeats": args.repeats,
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
