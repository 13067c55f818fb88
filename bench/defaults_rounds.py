"""The later rounds of the defaults study (issue #17), each a ``--part`` of
``bench/defaults_study.py``: the same proxies, candidates and runs (``defaults_study.run``),
several seeds per cell. Their tables are in docs/defaults.md.

* ``averaging``: the weights' moving average, learning rates and the CNN at ε = 8;
* ``learning-rates``: images, the CNN with the average at small steps;
* ``kernels``: images at ε = 3, one change at a time to the CNN the rule chose (averaging,
  widths, kernel, clipping norm, momentum, batch and epochs), then the best confirmed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from defaults_study import (
    DELTA,
    Candidate,
    Proxy,
    clean_image_proxy,
    image_proxy,
    run,
    tabular_proxies,
)

from ppml.specs import ModelSpec

Cells = list[tuple[Candidate, tuple[float, ...]]]


def averaging_candidates(kind: str) -> list[Candidate]:
    """Part ``averaging`` (issue #17's second round): the weights' moving average (EMA),
    learning rates and the CNN at ε = 8, three seeds each."""
    logreg = ModelSpec(arch="logreg")
    if kind == "tabular":
        return [
            Candidate("logreg b=n/4 lr0.2 e30", logreg, 0.25, 0.2, 30),
            Candidate("logreg b=n/4 lr0.2 e30 ema.9", logreg, 0.25, 0.2, 30, ema=0.9),
            Candidate("logreg b=n/8 lr0.1 e30", logreg, 0.125, 0.1, 30),
            Candidate("logreg b=n/8 lr0.1 e30 ema.9", logreg, 0.125, 0.1, 30, ema=0.9),
        ]
    cnn, mlp = (
        ModelSpec(arch="cnn2d", channels=[16, 32], kernel_size=3),
        ModelSpec(arch="mlp", hidden_sizes=[128]),
    )
    return [
        Candidate("logreg b256 lr0.5 e30", logreg, 256, 0.5, 30),
        Candidate("logreg b256 lr0.5 e30 ema.9", logreg, 256, 0.5, 30, ema=0.9),
        Candidate("logreg b256 lr0.5 e60 ema.95", logreg, 256, 0.5, 60, ema=0.95),
        Candidate("mlp[128] b256 lr0.5 e30", mlp, 256, 0.5, 30),
        Candidate("mlp[128] b256 lr0.5 e30 ema.95", mlp, 256, 0.5, 30, ema=0.95),
        Candidate("cnn2d[16,32] b256 lr0.5 e30", cnn, 256, 0.5, 30),
        Candidate("cnn2d[16,32] b256 lr0.5 e30 ema.95", cnn, 256, 0.5, 30, ema=0.95),
        Candidate("cnn2d[16,32] b256 lr0.3 e30 ema.95", cnn, 256, 0.3, 30, ema=0.95),
        Candidate("cnn2d[16,32] b128 lr0.25 e30 ema.95", cnn, 128, 0.25, 30, ema=0.95),
    ]


def learning_rate_cells() -> Cells:
    """Part ``learning-rates`` (issue #17's third round, images): the CNN with the average
    at small steps against the logistic regression, each candidate at the ε it was run at;
    at ε = 3 also the logistic regression's steps, batches and clipping norms."""
    logreg = ModelSpec(arch="logreg")
    cnn = ModelSpec(arch="cnn2d", channels=[16, 32], kernel_size=3)

    def conv(lr: float) -> Candidate:
        return Candidate(f"cnn2d[16,32] b256 lr{lr:g} e30 ema.95", cnn, 256, lr, 30, ema=0.95)

    at3 = (3.0,)
    return [
        (Candidate("logreg b256 lr0.5 e30", logreg, 256, 0.5, 30), (1.0, 2.0, 3.0, 5.0)),
        (Candidate("logreg b256 lr0.3 e30", logreg, 256, 0.3, 30), at3),
        (Candidate("logreg b256 lr1.0 e30", logreg, 256, 1.0, 30), at3),
        (Candidate("logreg b256 lr0.5 e20", logreg, 256, 0.5, 20), at3),
        (Candidate("logreg b256 lr0.5 e45", logreg, 256, 0.5, 45), at3),
        (Candidate("logreg b128 lr0.5 e30", logreg, 128, 0.5, 30), at3),
        (Candidate("logreg b=n/4 lr0.75 e30", logreg, 0.25, 0.75, 30), at3),
        (Candidate("logreg b=n/4 lr1.0 e60", logreg, 0.25, 1.0, 60), at3),
        (Candidate("logreg b256 C0.1 lr5 e30", logreg, 256, 5.0, 30, clip=0.1), at3),
        (Candidate("logreg b256 C0.5 lr1.0 e30", logreg, 256, 1.0, 30, clip=0.5), at3),
        (Candidate("logreg b256 C2 lr0.25 e30", logreg, 256, 0.25, 30, clip=2.0), at3),
        (conv(0.05), (1.0, 2.0)),
        (conv(0.1), (1.0, 2.0, 3.0, 5.0, 8.0)),
        (conv(0.15), (3.0, 5.0, 8.0)),
        (conv(0.2), (3.0, 5.0)),
        (conv(0.3), (5.0, 8.0)),
    ]


def learning_rates(out: str) -> None:
    """The third round: mean test accuracy of seeds 0, 1, 2 on both image proxies."""
    rows = _image_table(learning_rate_cells(), (1.0, 2.0, 3.0, 5.0, 8.0), range(3))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"delta": DELTA, "seeds": 3, "rows": rows}, indent=2))


def averaging(epsilons: tuple[float, ...], out: str) -> None:
    """The second round: mean test accuracy of seeds 0, 1, 2 per cell."""
    proxies = [clean_image_proxy(), image_proxy(), *tabular_proxies()]
    rows: list[dict[str, Any]] = []
    print("| proxy | candidate | " + " | ".join(f"ε={e:g}" for e in epsilons) + " |")
    print("|" + "---|" * (2 + len(epsilons)))
    for proxy in proxies:
        for cand in averaging_candidates(proxy.kind):
            accs = [
                float(np.mean([run(proxy, cand, e, seed) for seed in range(3)])) for e in epsilons
            ]
            rows.append({"proxy": proxy.name, "candidate": cand.label, "accuracy": accs})
            print(f"| {proxy.name} | {cand.label} | {' | '.join(f'{a:.3f}' for a in accs)} |")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"delta": DELTA, "seeds": 3, "rows": rows}, indent=2))


def _image_table(cells: Cells, epsilons: tuple[float, ...], seeds: range) -> list[dict[str, Any]]:
    """Mean test accuracy over ``seeds`` of each cell on both image proxies, printed."""
    rows: list[dict[str, Any]] = []
    print("| proxy | candidate | " + " | ".join(f"ε={e:g}" for e in epsilons) + " |")
    print("|" + "---|" * (2 + len(epsilons)))
    proxies: tuple[Proxy, ...] = (clean_image_proxy(), image_proxy())
    for proxy in proxies:
        for cand, at in cells:
            accs = {e: float(np.mean([run(proxy, cand, e, seed) for seed in seeds])) for e in at}
            rows.append({"proxy": proxy.name, "candidate": cand.label, "accuracy": accs})
            cells_text = " | ".join(f"{accs[e]:.3f}" if e in accs else "—" for e in epsilons)
            print(f"| {proxy.name} | {cand.label} | {cells_text} |", flush=True)
    return rows


def kernel_screen() -> list[Candidate]:
    """Part ``kernels``, the screen: the rule at 3 ≤ ε < 8 (cnn2d [16,32] 3 x 3, batch 256,
    30 epochs, lr 0.1, momentum 0.9, average 0.95, C 1) and one change at a time; a
    smaller or larger C takes lr / C, another momentum the same lr / (1 − momentum)."""

    def cnn(channels: tuple[int, ...] = (16, 32), kernel: int = 3) -> ModelSpec:
        return ModelSpec(arch="cnn2d", channels=list(channels), kernel_size=kernel)

    def one(label: str, **change: Any) -> Candidate:
        base: dict[str, Any] = {"model": cnn(), "batch": 256, "lr": 0.1, "epochs": 30}
        return Candidate(label, **{**base, "ema": 0.95, **change})

    return [
        one("rule (3 x 3)"),
        one("ema.9", ema=0.9),
        one("ema.98", ema=0.98),
        one("ema.99", ema=0.99),
        one("channels [32,32]", model=cnn((32, 32))),
        one("channels [16,16]", model=cnn((16, 16))),
        one("channels [32,64]", model=cnn((32, 64))),
        one("5 x 5", model=cnn(kernel=5)),
        one("C0.5 lr0.2", clip=0.5, lr=0.2),
        one("C2 lr0.05", clip=2.0, lr=0.05),
        one("m0.8 lr0.2", momentum=0.8, lr=0.2),
        one("m0.95 lr0.05", momentum=0.95, lr=0.05),
        one("b192 e25", batch=192, epochs=25),
        one("b320 e35", batch=320, epochs=35),
    ]


def kernel_confirmation() -> Cells:
    """Part ``kernels``, the confirmation: the rule and the screen's two best, at the rule's
    step for each ε (lr 0.1 below ε = 8, 0.15 from it)."""
    by_label = {c.label: c for c in kernel_screen()}
    rule, five, wide = by_label["rule (3 x 3)"], by_label["5 x 5"], by_label["channels [32,32]"]

    def at8(cand: Candidate) -> Candidate:
        return Candidate(
            f"{cand.label} lr0.15", cand.model, cand.batch, 0.15, cand.epochs, ema=cand.ema
        )

    return [
        (rule, (3.0, 5.0)),
        (five, (3.0, 5.0)),
        (wide, (3.0, 5.0)),
        (at8(rule), (8.0,)),
        (at8(five), (8.0,)),
    ]


def kernels(out: str) -> None:
    """The fourth round: the screen at ε = 3 (seed 0), the confirmation at ε = 3, 5 and 8
    (seeds 0, 1, 2), and the rule against 5 x 5 at ε = 3 on three further seeds (3, 4, 5)."""
    screen = _image_table([(c, (3.0,)) for c in kernel_screen()], (3.0,), range(1))
    print()
    confirmation = _image_table(kernel_confirmation(), (3.0, 5.0, 8.0), range(3))
    print()
    by_label = {c.label: c for c in kernel_screen()}
    further = [(by_label["rule (3 x 3)"], (3.0,)), (by_label["5 x 5"], (3.0,))]
    more_seeds = _image_table(further, (3.0,), range(3, 6))
    result = {"screen": screen, "confirmation": confirmation, "seeds 3-5": more_seeds}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"delta": DELTA, **result}, indent=2))
