"""PATE's student against DP-SGD at the same ε on digits (δ = 1e-5).

Data: the built-in digits (keyed split, fixed secret). For the student, the training split is
cut in two halves by a seeded permutation (chosen without looking at the data): the
**private** half is the protected data, the **public** half is declared public and
*unlabelled* (its labels are never read).

* ``pate``: ``k`` teachers (the service's code: ``ppml.jobs.pate.teacher_partitions``, a keyed
  hash of each private record, and ``ppml.training.pate.train_teachers``, no DP) label the
  first ``m`` public rows by GNMax (``ppml.privacy.gnmax``), sigma chosen so that the ``m``
  answers cost ε on the ledger's curve (the data-independent bound, rho = m/sigma²); a
  student (non-private, public rows only) trains on those labels. The student's ε is the
  answers' ε: training on public rows with released labels is post-processing.
* ``dp-sgd``: the same MLP trained by DP-SGD (``ppml.training.dp_sgd.train``, fast engine
  where it applies), σ calibrated for ε (``calibrate_noise``, the ledger's accounting), on
  the private half (the same protected rows as PATE), and on the whole training split.
* references without privacy: the MLP on the private half, and the teachers' noiseless
  plurality vote.

Accuracy is on the held-out split. Each figure is the mean over ``--repeats`` runs.

Usage::

    .venv/bin/python bench/pate.py [--repeats 3] [--teachers 25 50 100] [--queries 20 50 100]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import print_table, save
from ppml.datasets import DatasetArrays, load_builtin
from ppml.jobs.pate import teacher_partitions
from ppml.privacy import accounting as acc
from ppml.privacy import calibration as cal
from ppml.privacy import gnmax
from ppml.privacy.zcdp import calibrate_zcdp
from ppml.specs import ModelSpec, TrainingSpec
from ppml.training.dp_sgd import DPPlan, TrainingPlan, train
from ppml.training.models import build_model
from ppml.training.pate import train_teachers

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)
MODEL = ModelSpec(arch="mlp", hidden_sizes=[64])
# Teachers hold a few tens of rows each: many epochs of Adam, so that each one fits its rows.
TEACHER = TrainingSpec(epochs=300, batch_size=32, learning_rate=0.01, optimizer="adam")
# The student and the non-private reference: about STUDENT_STEPS steps whatever the rows.
STUDENT = TrainingSpec(epochs=1, batch_size=32, learning_rate=0.01, optimizer="adam")
STUDENT_STEPS = 600
DP_EPOCHS, DP_BATCH, DP_LR, DP_CLIP = 30, 128, 0.5, 1.0


def _plan(spec: TrainingSpec, rows: int, seed: int) -> TrainingPlan:
    per_epoch = math.ceil(rows / spec.batch_size)
    epochs = math.ceil(STUDENT_STEPS / per_epoch)
    return TrainingPlan(
        model=MODEL,
        epochs=epochs,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        optimizer=spec.optimizer,
        seed=seed,
        steps_per_epoch=per_epoch,
        total_steps=epochs * per_epoch,
    )


def plain_accuracy(x: np.ndarray, y: np.ndarray, arrays: DatasetArrays, seed: int) -> float:
    """A non-private MLP on ``(x, y)``, scored on the held-out split."""
    result = train(
        x_train=x,
        y_train=y,
        x_test=arrays.x_test,
        y_test=arrays.y_test,
        num_classes=arrays.num_classes,
        plan=_plan(STUDENT, len(y), seed),
        dp=None,
        device="cpu",
    )
    return float(result.metrics["test_accuracy"])


def dp_sgd_accuracy(
    x: np.ndarray, y: np.ndarray, arrays: DatasetArrays, epsilon: float, seed: int
) -> tuple[float, float]:
    """DP-SGD at ``epsilon`` on ``(x, y)``: held-out accuracy and σ."""
    q, per_epoch, total = cal.plan_dp_sgd(num_records=len(y), batch_size=DP_BATCH, epochs=DP_EPOCHS)
    sigma = cal.calibrate_noise(target_epsilon=epsilon, delta=DELTA, sample_rate=q, steps=total)
    plan = TrainingPlan(
        model=MODEL,
        epochs=DP_EPOCHS,
        batch_size=DP_BATCH,
        learning_rate=DP_LR,
        optimizer="sgd",
        seed=seed,
        steps_per_epoch=per_epoch,
        total_steps=total,
    )
    result = train(
        x_train=x,
        y_train=y,
        x_test=arrays.x_test,
        y_test=arrays.y_test,
        num_classes=arrays.num_classes,
        plan=plan,
        dp=DPPlan(noise_multiplier=sigma, max_grad_norm=DP_CLIP, sample_rate=q, delta=DELTA),
        device="cpu",
        dp_seed=seed,
    )
    return float(result.metrics["test_accuracy"]), sigma


def batch_sigma(queries: int, epsilon: float) -> float:
    """The smallest sigma whose ``queries`` answers cost at most ``epsilon`` on the ledger."""
    rho = calibrate_zcdp(target_epsilon=epsilon, delta=DELTA)
    sigma = math.sqrt(queries / rho)
    while gnmax.gnmax_rho(queries, sigma) > rho:
        sigma = math.nextafter(sigma, math.inf)
    assert acc.epsilon(acc.rdp_curve(gnmax.gnmax_event(queries, sigma)), DELTA) <= epsilon
    return sigma


def teacher_votes(
    private: DatasetArrays, inputs: list[np.ndarray], teachers: int, seed: int
) -> list[np.ndarray]:
    """The vote counts ``(n, K)`` on each of ``inputs`` of ``teachers`` teachers trained on
    ``private``."""
    parts = teacher_partitions(private, secret="7a" * 16, teachers=teachers, seed=seed)
    weights = train_teachers(
        x=private.x_train,
        y=private.y_train,
        partitions=parts,
        num_classes=private.num_classes,
        model=MODEL,
        training=TEACHER.model_copy(update={"seed": seed}),
    )
    assert weights is not None
    logits: list[list[np.ndarray]] = [[] for _ in inputs]
    with torch.no_grad():
        for state in weights:
            module = build_model(MODEL, num_features=private.x_train.shape[1], num_classes=10)
            module.load_state_dict(state)
            for out, x in zip(logits, inputs, strict=True):
                out.append(module.eval()(torch.from_numpy(x)).numpy())
    return [gnmax.vote_counts(np.stack(out, axis=1), private.num_classes) for out in logits]


def halves(arrays: DatasetArrays, seed: int) -> tuple[DatasetArrays, np.ndarray]:
    """The private half (as arrays) and the public half's features (labels dropped)."""
    order = np.random.default_rng(seed).permutation(len(arrays.y_train))
    private_rows, public_rows = np.sort(order[: len(order) // 2]), order[len(order) // 2 :]
    private = DatasetArrays(
        x_train=arrays.x_train[private_rows],
        y_train=arrays.y_train[private_rows],
        x_test=arrays.x_test,
        y_test=arrays.y_test,
        classes=arrays.classes,
        feature_names=arrays.feature_names,
    )
    return private, np.ascontiguousarray(arrays.x_train[public_rows])


def run_pate(
    arrays: DatasetArrays, args: argparse.Namespace, results: list[dict[str, Any]]
) -> dict[str, float]:
    """PATE rows of every (ε, k, m, repeat); returns the teachers' noiseless accuracy."""
    ensemble: dict[str, list[float]] = {}
    for teachers, repeat in itertools.product(args.teachers, range(args.repeats)):
        private, public_x = halves(arrays, repeat)
        start = time.perf_counter()
        votes, test_votes = teacher_votes(private, [public_x, arrays.x_test], teachers, repeat)
        seconds = time.perf_counter() - start
        plurality = float((test_votes.argmax(axis=1) == arrays.y_test).mean())
        ensemble.setdefault(str(teachers), []).append(plurality)
        for epsilon, queries in itertools.product(EPSILONS, args.queries):
            sigma = batch_sigma(queries, epsilon)
            rng = np.random.default_rng(10_000 + repeat)
            labels = gnmax.noisy_argmax(votes[:queries], sigma, rng)
            student = plain_accuracy(public_x[:queries], labels, arrays, repeat)
            results.append(
                {
                    "method": "pate",
                    "epsilon": epsilon,
                    "teachers": teachers,
                    "queries": queries,
                    "sigma": sigma,
                    "label_accuracy": float((labels == votes[:queries].argmax(axis=1)).mean()),
                    "accuracy": student,
                    "repeat": repeat,
                    "teacher_seconds": seconds,
                }
            )
            print(f"pate ε={epsilon} k={teachers} m={queries}: {student:.3f}", flush=True)
    return {k: float(np.mean(v)) for k, v in ensemble.items()}


def run_dp_sgd(
    arrays: DatasetArrays, args: argparse.Namespace, results: list[dict[str, Any]]
) -> None:
    for epsilon, repeat in itertools.product(EPSILONS, range(args.repeats)):
        private, _ = halves(arrays, repeat)
        for data, (x, y) in (
            ("private half", (private.x_train, private.y_train)),
            ("whole train split", (arrays.x_train, arrays.y_train)),
        ):
            accuracy, sigma = dp_sgd_accuracy(x, y, arrays, epsilon, repeat)
            results.append(
                {
                    "method": "dp-sgd",
                    "data": data,
                    "epsilon": epsilon,
                    "sigma": sigma,
                    "accuracy": accuracy,
                    "repeat": repeat,
                }
            )
            print(f"dp-sgd ε={epsilon} {data}: {accuracy:.3f}", flush=True)


def _mean(rows: list[dict[str, Any]], **match: Any) -> float:
    found = [r["accuracy"] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return float(np.mean(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teachers", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--queries", type=int, nargs="+", default=[20, 50, 100])
    args = parser.parse_args()
    torch.set_num_threads(1)
    arrays = load_builtin("digits", secret="5e" * 16)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    ensemble = run_pate(arrays, args, results)
    run_dp_sgd(arrays, args, results)
    plain = []
    for repeat in range(args.repeats):
        private, _ = halves(arrays, repeat)
        plain.append(plain_accuracy(private.x_train, private.y_train, arrays, repeat))
    header = ["ε", "method", "data / setting", "accuracy"]
    rows: list[list[Any]] = []
    for epsilon in EPSILONS:
        for teachers, queries in itertools.product(args.teachers, args.queries):
            accuracy = _mean(
                results, method="pate", epsilon=epsilon, teachers=teachers, queries=queries
            )
            rows.append(
                [
                    epsilon,
                    "PATE student",
                    f"k={teachers} teachers, m={queries} answers",
                    f"{accuracy:.3f}",
                ]
            )
        for data in ("private half", "whole train split"):
            accuracy = _mean(results, method="dp-sgd", epsilon=epsilon, data=data)
            rows.append([epsilon, "DP-SGD", data, f"{accuracy:.3f}"])
    rows.append(["∞", "MLP, no DP", "private half", f"{np.mean(plain):.3f}"])
    for teachers, accuracy in ensemble.items():
        rows.append(["∞", "teachers' plurality", f"k={teachers}, no noise", f"{accuracy:.3f}"])
    title = (
        f"digits, δ={DELTA:g}, held-out accuracy, mean of {args.repeats} run(s); PATE: "
        f"private half = {len(arrays.y_train) // 2} training rows, the other half declared "
        "public and unlabelled for the student"
    )
    print_table(title, header, rows)
    print(f"({time.perf_counter() - start:.0f} s)")
    save(
        "pate",
        {
            "delta": DELTA,
            "epsilons": list(EPSILONS),
            "teachers": args.teachers,
            "queries": args.queries,
            "repeats": args.repeats,
            "model": MODEL.model_dump(),
            "no_dp_private_half": float(np.mean(plain)),
            "teachers_plurality": ensemble,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
