"""The data-parallel DP step (``ppml.training.parallel``), for ``bench/dp_step.py --gpus N``.

N processes (GPUs ``cuda:0..N-1`` with NCCL, or gloo processes on CPU) each clip their share
of the same fixed batch; rank 0 adds the noise; one all-reduce sums the gradients. In each
repeat, rank 0 first times the single-process fast step on the whole batch while the other
ranks wait, then every rank times the data-parallel step: the speed-up is the median over
repeats of the ratio within a repeat, as in the main table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import socket
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dp_step import CLIP, LR, MODELS, SIGMA, Step, _seconds
from torch import Tensor, nn
from torch.multiprocessing import spawn
from torch.nn import functional as F

from ppml.training.fast_dp import FastDPEngine
from ppml.training.parallel import DistributedDPEngine

__all__ = ["data_parallel", "print_parallel"]


def _step(engine: FastDPEngine, model: nn.Module, x: Tensor, y: Tensor) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        engine.backward(F.cross_entropy(model(x), y, reduction="sum"))
        optimizer.step()

    return step


def _replica(
    rank: int, world: int, address: str, name: str, options: dict[str, Any], out: str
) -> None:
    """One rank; rank 0 writes the per-repeat times of both steps to ``out``."""
    device = torch.device("cuda", rank) if options["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(options["threads"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=world)
    try:
        batch = options["batch"]
        builder, shape = MODELS[name]
        torch.manual_seed(0)
        initial = builder()
        data = torch.Generator().manual_seed(1)
        x = torch.randn(batch, *shape, generator=data).to(device)
        y = torch.randint(0, 10, (batch,), generator=data).to(device)
        model = copy.deepcopy(initial).to(device)
        engine = DistributedDPEngine(
            model,
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=batch,  # the global batch: the sum and the noise are global
            generator=torch.Generator(device=device).manual_seed(rank),
        )
        parallel = _step(engine, model, x[rank::world], y[rank::world])
        single: Step | None = None
        if rank == 0:
            alone = copy.deepcopy(initial).to(device)
            gen = torch.Generator(device=device).manual_seed(0)
            one = FastDPEngine(
                alone,
                noise_multiplier=SIGMA,
                max_grad_norm=CLIP,
                expected_batch_size=batch,
                generator=gen,
            )
            single = _step(one, alone, x, y)
            single()
        parallel()
        # every rank runs the same number of steps (each one is a collective)
        target = options["target_s"]
        count = torch.tensor([max(2, math.ceil(target / _seconds(parallel, 2, device)[0]))])
        dist.broadcast(count, src=0)
        iterations = int(count.item())
        times: dict[str, list[float]] = {"single": [], "parallel": []}
        for _ in range(options["repeats"]):
            dist.barrier()
            if single is not None:
                times["single"].append(_seconds(single, iterations, device)[0])
            dist.barrier()
            times["parallel"].append(_seconds(parallel, iterations, device)[0])
        if rank == 0:
            Path(out).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def data_parallel(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Times the data-parallel DP step on ``args.gpus`` processes for every model."""
    threads = torch.get_num_threads()
    options = {
        "device": device.type,
        "batch": args.batch,
        "repeats": args.repeats,
        "target_s": args.target_seconds,
        # gloo ranks share this machine's cores
        "threads": max(1, threads // args.gpus) if device.type == "cpu" else threads,
    }
    results = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as folder:
            out = str(Path(folder) / "times.json")
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
            spawn(_replica, args=(args.gpus, address, name, options, out), nprocs=args.gpus)
            times = json.loads(Path(out).read_text())
        ratios = [s / p for s, p in zip(times["single"], times["parallel"], strict=True)]
        step = statistics.median(times["parallel"])
        results.append(
            {
                "model": name,
                "processes": args.gpus,
                "step_ms": step * 1e3,
                "samples_per_s": args.batch / step,
                "single_process_ms": statistics.median(times["single"]) * 1e3,
                "speedup": statistics.median(ratios),
                "speedup_range": [min(ratios), max(ratios)],
                "threads_per_rank": options["threads"],
                "repeats": args.repeats,
            }
        )
    return results


def print_parallel(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'model':<20}{'processes':>10}{'step ms':>9}{'samples/s':>11}"
        f"{'1-process ms':>14}{'speed-up':>10}{'range':>13}"
    )
    for row in rows:
        low, high = row["speedup_range"]
        print(
            f"{row['model']:<20}{row['processes']:>10}{row['step_ms']:>9.2f}"
            f"{row['samples_per_s']:>11.0f}{row['single_process_ms']:>14.2f}"
            f"{row['speedup']:>9.2f}x{f'{low:.2f}-{high:.2f}':>13}"
        )
