"""DP-SGD step throughput: non-private vs Opacus hooks vs Opacus ghost clipping vs fast_dp.

Every variant trains its own copy of the same initial model on the same fixed batch
(no sampling, so only the gradient step is timed: forward, backward, clipping, noise,
optimizer step). The variants are interleaved within each repeat, in a rotating order,
and the slowdown is the median over repeats of ``variant time / non-private time`` from
the same repeat, so load from other processes hits both sides of each ratio alike.
The models are the registry's architectures on MNIST-1D-shaped rows (40 features) and
``cnn2d`` on 8x8 (digits) and 28x28 grey images; ``--threads 1`` gives the steadiest
ratios on a shared machine.

``--e2e`` also times a whole DP ``train()`` on MNIST-1D (MLP 256-256, 60 epochs, batch
256) against its non-private twin, again interleaved.

``--gpus N`` (N ≥ 2) also times the data-parallel DP step on N processes against the
single-process fast step, interleaved the same way (``bench/dp_parallel.py``).

Usage::

    .venv/bin/python bench/dp_step.py [--device cuda] [--repeats 7] [--e2e] [--gpus 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import opacus
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import Tensor, nn
from torch.nn import functional as F

from ppml.specs import ModelSpec
from ppml.storage import LocalStore
from ppml.training import DPPlan, TrainingPlan, build_model, train
from ppml.training.fast_dp import FastDPEngine

VARIANTS = ("non-private", "opacus-hooks", "opacus-ghost", "fast")
SIGMA, CLIP, LR = 1.0, 1.0, 0.05
MNIST1D = {"num_features": 40, "num_classes": 10}

Step = Callable[[], None]


def _cnn2d(side: int, kernel: int = 3) -> nn.Module:
    """The registry's cnn2d (two ``kernel x kernel`` conv blocks, 16 and 32 channels,
    GroupNorm, ReLU, max-pool; a linear head) on flat rows of ``side x side`` grey images."""
    spec = ModelSpec(arch="cnn2d", channels=[16, 32], kernel_size=kernel)
    return build_model(spec, num_features=side * side, num_classes=10, input_shape=(1, side, side))


# name -> (builder, input shape without the batch)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp-40-256-256-10": (
        lambda: build_model(ModelSpec(arch="mlp", hidden_sizes=[256, 256]), **MNIST1D),
        (40,),
    ),
    "cnn2d-8x8": (lambda: _cnn2d(8), (64,)),  # digits
    "cnn2d-8x8-k5": (lambda: _cnn2d(8, 5), (64,)),  # the private default for images, ε ≥ 3
    "cnn2d-28x28": (lambda: _cnn2d(28), (784,)),  # MNIST-sized
    "logreg": (lambda: build_model(ModelSpec(arch="logreg"), **MNIST1D), (40,)),
    "mlp": (lambda: build_model(ModelSpec(arch="mlp"), **MNIST1D), (40,)),
    "cnn1d": (lambda: build_model(ModelSpec(arch="cnn1d"), **MNIST1D), (40,)),
}


def _non_private(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def _opacus_hooks(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    # as ppml.training.dp_sgd sets it up: summed loss, DPOptimizer divides by E[B]
    gsm = GradSampleModule(model, loss_reduction="sum", strict=True)
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=LR),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=len(x),
        loss_reduction="mean",
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        optimizer.step()

    return step


def _opacus_ghost(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    # what PrivacyEngine.make_private(..., grad_sample_mode="ghost") assembles
    gsm = GradSampleModuleFastGradientClipping(
        model, max_grad_norm=CLIP, use_ghost_clipping=True, loss_reduction="mean"
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=LR),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=len(x),
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(
        gsm, optimizer, nn.CrossEntropyLoss(reduction="mean"), loss_reduction="mean"
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(gsm(x), y).backward()
        optimizer.step()

    return step


def _fast(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine = FastDPEngine(
        model,
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=len(x),
        generator=torch.Generator(device=x.device).manual_seed(0),
    )

    def step() -> None:
        engine.backward(F.cross_entropy(model(x), y, reduction="sum"))
        optimizer.step()

    return step


BUILDERS: dict[str, Callable[[nn.Module, Tensor, Tensor], Step]] = {
    "non-private": _non_private,
    "opacus-hooks": _opacus_hooks,
    "opacus-ghost": _opacus_ghost,
    "fast": _fast,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(step: Step, iterations: int, device: torch.device) -> tuple[float, float]:
    """Mean wall-clock and process-CPU seconds per step over ``iterations`` steps.

    CPU time leaves out the time this process waited for a core, so under load from
    other processes it is the steadier of the two (with one thread it is the work).
    """
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iterations):
        step()
    _sync(device)
    return (time.perf_counter() - wall) / iterations, (time.process_time() - cpu) / iterations


def bench_model(
    name: str, device: torch.device, batch: int, repeats: int, target_s: float
) -> list[dict[str, Any]]:
    """Times every variant on one model; returns one row per variant."""
    builder, shape = MODELS[name]
    torch.manual_seed(0)
    initial = builder()
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {v: BUILDERS[v](copy.deepcopy(initial).to(device), x, y) for v in VARIANTS}
    iterations = {}
    for variant, step in steps.items():
        step()  # first call: lazy initialisation, allocator warm-up
        iterations[variant] = max(2, math.ceil(target_s / _seconds(step, 2, device)[0]))
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for variant in order:
            seconds = _seconds(steps[variant], iterations[variant], device)
            wall[variant].append(seconds[0])
            cpu[variant].append(seconds[1])
    rows = []
    for variant in VARIANTS:
        median = statistics.median(wall[variant])
        ratios = _ratios(wall[variant], wall["non-private"])
        rows.append(
            {
                "model": name,
                "variant": variant,
                "step_ms": median * 1e3,
                "samples_per_s": batch / median,
                "slowdown": statistics.median(ratios),
                "slowdown_range": [min(ratios), max(ratios)],
                "cpu_slowdown": statistics.median(_ratios(cpu[variant], cpu["non-private"])),
                "repeats": repeats,
                "steps_per_repeat": iterations[variant],
            }
        )
    return rows


def _ratios(times: list[float], base: list[float]) -> list[float]:
    """Each repeat's time over the baseline's time in the same repeat."""
    return [t / b for t, b in zip(times, base, strict=True)]


def e2e(device: str, repeats: int, epochs: int) -> dict[str, Any]:
    """Times DP ``train()`` (engine auto) against its non-private twin on MNIST-1D."""
    from ppml.datasets import load_builtin

    data = load_builtin("mnist1d", cache=LocalStore(Path("/tmp/ppml-cache")))
    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / 256)
    plan = TrainingPlan(
        model=ModelSpec(arch="mlp", hidden_sizes=[256, 256]),
        epochs=epochs,
        batch_size=256,
        learning_rate=0.1,
        optimizer="sgd",
        momentum=0.9,
        steps_per_epoch=steps_per_epoch,
        total_steps=epochs * steps_per_epoch,
    )
    dp = DPPlan(noise_multiplier=SIGMA, max_grad_norm=CLIP, sample_rate=256 / n, delta=1e-5)
    arrays = {
        "x_train": data.x_train,
        "y_train": data.y_train,
        "x_test": data.x_test,
        "y_test": data.y_test,
    }
    wall: dict[str, list[float]] = {"non-private": [], "dp": []}
    cpu: dict[str, list[float]] = {"non-private": [], "dp": []}
    metrics: dict[str, dict[str, float]] = {}
    for r in range(repeats):
        for kind in ("non-private", "dp") if r % 2 == 0 else ("dp", "non-private"):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = train(
                **arrays,
                num_classes=10,
                plan=plan,
                dp=dp if kind == "dp" else None,
                device=device,
            )
            _sync(torch.device(device))
            wall[kind].append(time.perf_counter() - start)
            cpu[kind].append(time.process_time() - start_cpu)
            metrics[kind] = dict(result.metrics)
    ratios = _ratios(wall["dp"], wall["non-private"])
    return {
        "epochs": epochs,
        "steps": plan.total_steps,
        "n_train": n,
        "seconds": {k: statistics.median(v) for k, v in wall.items()},
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "cpu_ratio": statistics.median(_ratios(cpu["dp"], cpu["non-private"])),
        "repeats": repeats,
        "metrics": metrics,
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'model':<20}{'variant':<15}{'step ms':>9}{'samples/s':>11}"
        f"{'slowdown':>10}{'range':>13}{'cpu slowdown':>14}"
    )
    for row in rows:
        low, high = row["slowdown_range"]
        print(
            f"{row['model']:<20}{row['variant']:<15}{row['step_ms']:>9.2f}"
            f"{row['samples_per_s']:>11.0f}{row['slowdown']:>9.2f}x"
            f"{f'{low:.2f}-{high:.2f}':>13}{row['cpu_slowdown']:>13.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--target-seconds", type=float, default=0.1, help="per variant, repeat")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=Path("bench/results/dp_step.json"))
    parser.add_argument("--e2e", action="store_true", help="also time train() on MNIST-1D")
    parser.add_argument("--e2e-repeats", type=int, default=3)
    parser.add_argument("--e2e-epochs", type=int, default=60)
    parser.add_argument(
        "--gpus", type=int, default=1, help="also time the data-parallel step on N processes"
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    if args.gpus < 1:
        parser.error("--gpus must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if device.type == "cuda" and torch.cuda.device_count() < args.gpus:
        parser.error(f"--gpus {args.gpus} but {torch.cuda.device_count()} GPUs are visible")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")

    rows = []
    for name in args.models:
        rows += bench_model(name, device, args.batch, args.repeats, args.target_seconds)
    _print_table(rows)
    report: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "batch": args.batch,
        "noise_multiplier": SIGMA,
        "max_grad_norm": CLIP,
        "results": rows,
    }
    if args.gpus > 1:
        from dp_parallel import data_parallel, print_parallel  # bench/ is on sys.path

        report["data_parallel"] = data_parallel(args, device)
        print_parallel(report["data_parallel"])
    if args.e2e:
        report["e2e"] = e2e(args.device, args.e2e_repeats, args.e2e_epochs)
        seconds = report["e2e"]["seconds"]
        print(
            f"\ne2e MNIST-1D MLP 256-256, {args.e2e_epochs} epochs: "
            f"non-private {seconds['non-private']:.1f} s, DP {seconds['dp']:.1f} s, "
            f"ratio {report['e2e']['ratio']:.2f}x (CPU time {report['e2e']['cpu_ratio']:.2f}x)"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
