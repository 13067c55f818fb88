"""The study behind ppml's default model and training (``ppml/defaults.py``), on public proxies.

ppml chooses a job's model and training from public metadata only (row count, features or
input shape, classes, ε, δ). The candidates compared here are trained through the same
code a job runs (``ppml.training.dp_sgd.train`` with a ``DPPlan`` on the fast engine, σ
calibrated by ``ppml.privacy.accounting`` as pricing does, 3% of ε left to the metrics), on
PUBLIC PROXY data only, never on the built-ins the service ships (digits, breast_cancer,
MNIST-1D at its default seed 0):

* ``signal``: MNIST-1D generated with seed 7 (new signals, 8,000 train / 2,000 test);
* ``image``: generated 8x8 grey images (10 classes: a random blob prototype per class,
  shifted by up to one pixel, with pixel noise; 1,500 train / 500 test);
* ``tabular``: scikit-learn's wine (13 features, 3 classes) scaled to [0, 1] by its
  documented ranges' maxima, and ``make_classification`` (30 features, 2 classes, 2,000
  rows) with features at scales 1 to 10.

Each candidate runs once per ε (seed 0) and the table prints test accuracy; the winner
per (kind, ε) is what ``ppml/defaults.py`` encodes. The committed table is in
``docs/defaults.md``.

Usage::

    .venv/bin/python bench/defaults_study.py [--quick] [--out bench/results/defaults_study.json]
    .venv/bin/python bench/defaults_study.py --part averaging        # second round, 3 seeds
    .venv/bin/python bench/defaults_study.py --part learning-rates   # third round, images
    .venv/bin/python bench/defaults_study.py --part kernels          # fourth round, images

The later rounds (``--part``) live in ``bench/defaults_rounds.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppml.privacy import calibration as cal
from ppml.specs import ModelSpec
from ppml.training import DPPlan, TrainingPlan, train

EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5
EVAL_SHARE = 0.03  # the default evaluation share: what training gets of ε is 97%
ROUNDS = ("averaging", "learning-rates", "kernels")  # bench/defaults_rounds.py


@dataclass(frozen=True)
class Proxy:
    name: str
    kind: str  # "signal", "image" or "tabular"
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Candidate:
    label: str
    model: ModelSpec
    batch: int | float  # an int: expected batch (at most n/4); a float: that fraction of n
    lr: float
    epochs: int
    momentum: float = 0.9
    ema: float = 0.0  # decay of the weights' moving average; 0: the last weights
    clip: float = 1.0  # the clipping norm C (σ is relative to it, the charge does not move)

    def batch_size(self, n: int) -> int:
        if isinstance(self.batch, float):
            return max(1, int(n * self.batch))
        return max(1, min(self.batch, n // 4))


def _split(x: np.ndarray, y: np.ndarray, test: float, seed: int) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * (1 - test))
    tr, te = order[:cut], order[cut:]
    f = np.float32
    return x[tr].astype(f), y[tr].astype(np.int64), x[te].astype(f), y[te].astype(np.int64)


def signal_proxy() -> Proxy:
    from ppml.datasets.builtins import _generate_mnist1d

    arrays = _generate_mnist1d(7)  # not the service's seed 0: new signals
    return Proxy(
        "mnist1d-seed7",
        "signal",
        arrays.x_train,
        arrays.y_train,
        arrays.x_test,
        arrays.y_test,
        10,
        (1, 40),
    )


def image_proxy(
    n: int = 2000, side: int = 8, seed: int = 3, noise: float = 0.25, name: str = "images-8x8"
) -> Proxy:
    rng = np.random.default_rng(seed)
    protos = rng.random((10, side + 2, side + 2)) ** 3  # sparse bright blobs, in [0, 1]
    y = rng.integers(0, 10, n)
    dx, dy = rng.integers(0, 3, n), rng.integers(0, 3, n)
    x = np.stack([protos[c, a : a + side, b : b + side] for c, a, b in zip(y, dx, dy, strict=True)])
    x = np.clip(x + rng.normal(0, noise, x.shape), 0, 1).reshape(n, -1)
    xtr, ytr, xte, yte = _split(x, y, 0.25, seed)
    return Proxy(name, "image", xtr, ytr, xte, yte, 10, (1, side, side))


def clean_image_proxy() -> Proxy:
    """Generated 8x8 images as separable as a handwritten-digit set: a linear model reaches
    about 0.97 without privacy (other blobs, pixel noise 0.15)."""
    return image_proxy(seed=11, noise=0.15, name="images-8x8-clean")


def tabular_proxies() -> list[Proxy]:
    from sklearn.datasets import load_wine, make_classification

    wine = load_wine()
    x = wine.data / wine.data.max(axis=0)  # documented ranges: every feature is non-negative
    out = [Proxy("wine", "tabular", *_split(x, wine.target, 0.25, 0), 3)]
    xc, yc = make_classification(
        n_samples=2000, n_features=30, n_informative=10, n_classes=2, random_state=5
    )
    scales = np.logspace(0, 1, 30)
    out.append(Proxy("make_classification", "tabular", *_split(xc * scales, yc, 0.25, 5), 2))
    return out


def candidates(kind: str) -> list[Candidate]:
    """The candidates per kind of data; momentum-free twins take lr / (1 - 0.9)."""
    logreg, mlp = ModelSpec(arch="logreg"), ModelSpec(arch="mlp", hidden_sizes=[128])
    if kind == "signal":
        c3 = ModelSpec(arch="cnn1d", channels=[32, 32, 32])
        return [
            Candidate("cnn1d[32,32,32] b1024 lr0.4 e40", c3, 1024, 0.4, 40),
            Candidate("cnn1d[32,32,32] b512 lr0.2 e30", c3, 512, 0.2, 30),
            Candidate("cnn1d[32,32,32] b512 lr0.2 e40", c3, 512, 0.2, 40),
            Candidate("cnn1d[32,32,32] b512 lr2.0 e30 m0", c3, 512, 2.0, 30, 0.0),
            Candidate("cnn1d[16,32] b1024 lr0.4 e40", ModelSpec(arch="cnn1d"), 1024, 0.4, 40),
            Candidate("mlp[128] b1024 lr0.4 e40", mlp, 1024, 0.4, 40),
        ]
    if kind == "image":
        cnn = ModelSpec(arch="cnn2d", channels=[16, 32], kernel_size=3)
        return [
            Candidate("logreg b256 lr1.0 e30", logreg, 256, 1.0, 30),
            Candidate("logreg b256 lr0.5 e30", logreg, 256, 0.5, 30),
            Candidate("logreg b128 lr0.5 e30", logreg, 128, 0.5, 30),
            Candidate("logreg b256 lr10 e30 m0", logreg, 256, 10.0, 30, 0.0),
            Candidate("cnn2d[16,32] b256 lr0.5 e30", cnn, 256, 0.5, 30),
            Candidate("cnn2d[16,32] b256 lr1.0 e60", cnn, 256, 1.0, 60),
            Candidate("mlp[128] b256 lr0.5 e30", mlp, 256, 0.5, 30),
        ]
    return [
        Candidate("logreg b=n/4 lr0.5 e30", logreg, 0.25, 0.5, 30),
        Candidate("logreg b=n/4 lr1.0 e60", logreg, 0.25, 1.0, 60),
        Candidate("logreg b=n/4 lr0.2 e30", logreg, 0.25, 0.2, 30),
        Candidate("logreg b=n/8 lr0.1 e30", logreg, 0.125, 0.1, 30),
        Candidate("logreg b=n/4 lr5 e30 m0", logreg, 0.25, 5.0, 30, 0.0),
        Candidate("mlp[128] b=n/4 lr0.5 e30", mlp, 0.25, 0.5, 30),
    ]


def public_candidates(kind: str) -> list[Candidate]:
    """Non-private candidates: the private choice's architecture, smaller batches."""
    model = {
        "signal": ModelSpec(arch="cnn1d", channels=[32, 32, 32]),
        "image": ModelSpec(arch="cnn2d", channels=[16, 32], kernel_size=3),
        "tabular": ModelSpec(arch="logreg"),
    }[kind]
    out = [
        Candidate(f"{model.arch} b64 lr0.1 e30", model, 64, 0.1, 30),
        Candidate(f"{model.arch} b64 lr0.02 e30", model, 64, 0.02, 30),
        Candidate(f"{model.arch} b256 lr0.1 e30", model, 256, 0.1, 30),
    ]
    if kind == "image":
        out.append(Candidate("logreg b64 lr0.1 e30", ModelSpec(arch="logreg"), 64, 0.1, 30))
    return out


def run(proxy: Proxy, cand: Candidate, epsilon: float | None, seed: int = 0) -> float:
    n = len(proxy.y_train)
    batch = cand.batch_size(n)
    q, per_epoch, total = cal.plan_dp_sgd(num_records=n, batch_size=batch, epochs=cand.epochs)
    plan = TrainingPlan(
        model=cand.model,
        epochs=cand.epochs,
        batch_size=batch,
        learning_rate=cand.lr,
        optimizer="sgd",
        momentum=cand.momentum,
        seed=seed,
        steps_per_epoch=per_epoch,
        total_steps=total,
        input_shape=proxy.input_shape,
        ema_decay=cand.ema,
    )
    dp = None
    if epsilon is not None:
        sigma = cal.calibrate_noise(
            target_epsilon=epsilon * (1 - EVAL_SHARE), delta=DELTA, sample_rate=q, steps=total
        )
        dp = DPPlan(noise_multiplier=sigma, max_grad_norm=cand.clip, sample_rate=q, delta=DELTA)
    result = train(
        x_train=proxy.x_train,
        y_train=proxy.y_train,
        x_test=proxy.x_test,
        y_test=proxy.y_test,
        num_classes=proxy.num_classes,
        plan=plan,
        dp=dp,
        device="cpu",
        dp_seed=seed,
        report_every=10**6,
    )
    return float(result.metrics["test_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one ε (3) only")
    parser.add_argument(
        "--part",
        choices=("all", "private", "public", *ROUNDS),
        default="all",
        help="which table (averaging, learning-rates, kernels: the second to fourth rounds, "
        "several seeds, not part of all)",
    )
    parser.add_argument("--out", default="bench/results/defaults_study.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    epsilons = (3.0,) if args.quick else EPSILONS
    if args.part in ROUNDS:
        import defaults_rounds  # the later rounds import this module's proxies and runs

        rounds = {
            "averaging": lambda: defaults_rounds.averaging(epsilons, args.out),
            "learning-rates": lambda: defaults_rounds.learning_rates(args.out),
            "kernels": lambda: defaults_rounds.kernels(args.out),
        }
        rounds[args.part]()
        return
    proxies = [signal_proxy(), image_proxy(), *tabular_proxies()]
    rows: list[dict[str, Any]] = []
    header = "| proxy | candidate | " + " | ".join(f"ε={e:g}" for e in epsilons) + " |"
    print(header)
    print("|" + "---|" * (2 + len(epsilons)))
    for proxy in proxies if args.part != "public" else []:
        for cand in candidates(proxy.kind):
            start = time.perf_counter()
            accs = [run(proxy, cand, e) for e in epsilons]
            rows.append(
                {
                    "proxy": proxy.name,
                    "kind": proxy.kind,
                    "candidate": cand.label,
                    "epsilons": list(epsilons),
                    "accuracy": accs,
                    "seconds": time.perf_counter() - start,
                }
            )
            cells = " | ".join(f"{a:.3f}" for a in accs)
            print(f"| {proxy.name} | {cand.label} | {cells} |", flush=True)
    if args.part != "private":
        print("\n| proxy | non-private candidate | accuracy |\n|---|---|---|")
    for proxy in proxies if args.part != "private" else []:
        for cand in public_candidates(proxy.kind):
            start = time.perf_counter()
            accuracy = run(proxy, cand, None)
            rows.append(
                {
                    "proxy": proxy.name,
                    "kind": proxy.kind,
                    "candidate": cand.label,
                    "epsilons": [None],
                    "accuracy": [accuracy],
                    "seconds": time.perf_counter() - start,
                }
            )
            print(f"| {proxy.name} | {cand.label} | {accuracy:.3f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"delta": DELTA, "rows": rows}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    assert all(math.isfinite(a) for r in rows for a in r["accuracy"])


if __name__ == "__main__":
    main()
