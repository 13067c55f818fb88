"""DP synthetic data quality: ppml's MST against mbi run directly, at ε ∈ {1, 3, 8}.

Data: the built-in breast_cancer table (keyed split, fixed secret), its first ``--features``
features and the label, binned on the documented bounds (``--bins`` per feature).

* ``ppml-mst``: what a synthesize job runs (``ppml.synthesis``): ε → rho on the ledger's grid
  (``calibrate_zcdp``), MST's three steps, ``mbi``'s estimate, the rows decoded;
* ``ppml-job``: the worker's own function, ``ppml.jobs.synthesis.synthesize_job``, on a job
  and dataset row built in memory and a local artefact store, charged the same rho: its
  bounds, budget split, MST, decoding and the quality report it publishes (read back from
  the store). Against ``ppml-mst`` it shows what the job's wrapping costs (nothing, up to
  the noise); its randomness comes from the OS, as in the service;
* ``mbi-star``: the library alone at the same rho, without MST's selection: Gaussian
  measurements of every 1-way marginal and of every (feature, label) 2-way marginal (a
  fixed star around the label, chosen without the data; rho split evenly), ``mbi``'s
  mirror-descent estimate and its ``synthetic_data``. (Measuring every pair would make the
  model's junction tree one clique of all columns: 8^8 x 2 cells at the defaults.)

Columns: mean TV distance of the 1- and 2-way marginals to the training rows, and the
accuracy of a logistic regression trained on the synthetic rows and tested on the held-out
rows (train-synthetic-test-real; ``real`` is the same model trained on the real rows).

Usage::

    .venv/bin/python bench/synthetic.py [--features 8] [--bins 8] [--repeats 1] [--no-job]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import print_table, save
from ppml.datasets import DatasetArrays, load_builtin
from ppml.db.models import Dataset, Job
from ppml.jobs.records import PrivacyRecord
from ppml.jobs.synthesis import REPORT, synthesize_job
from ppml.privacy import accounting as acc
from ppml.privacy.zcdp import calibrate_zcdp
from ppml.specs import JobSpec
from ppml.storage.local import LocalStore
from ppml.synthesis.mst import load_mbi, synthesize
from ppml.synthesis.quality import marginal_distances, tstr_accuracy
from ppml.synthesis.table import LABEL, Table, builtin_bounds

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)


def mbi_star(
    columns: dict[str, np.ndarray], sizes: tuple[int, ...], rho: float, rows: int, seed: int
) -> dict[str, np.ndarray]:
    """Every 1-way and every (feature, label) marginal measured once with Gaussian noise,
    mbi's estimate."""
    mbi = load_mbi()
    rng = np.random.default_rng(seed)
    np.random.seed(seed)
    names = tuple(columns)
    domain = mbi.Domain(names, sizes)
    data = mbi.Dataset(columns, domain)
    cliques = [(a,) for a in names] + [(a, LABEL) for a in names if a != LABEL]
    # Each record adds one count to each marginal: L2 sensitivity sqrt(#cliques).
    sigma = math.sqrt(len(cliques) / (2 * rho))
    measured = []
    for clique in cliques:
        counts = np.asarray(data.project(clique).datavector(), dtype=np.float64)
        noisy = counts + rng.normal(0, sigma, counts.size)
        measured.append(mbi.LinearMeasurement(noisy, clique, stddev=sigma))
    model = mbi.estimation.MirrorDescent().estimate(domain, measured, iters=1000)
    synthetic = model.synthetic_data(rows)
    return {a: np.asarray(synthetic.data[a], dtype=np.int64) for a in names}


def job_run(
    arrays: DatasetArrays, *, features: int, bins: int, rho: float, epsilon: float, root: Path
) -> dict[str, Any]:
    """The worker's ``synthesize_job`` at ``rho``; the ``private`` part of its report."""
    spec = JobSpec.model_validate(
        {
            "name": "bench",
            "dataset_id": "ds_bench",
            "kind": "synthesize",
            "privacy": {"target_epsilon": epsilon},
            "synthesize": {"features": list(range(features)), "bins": bins},
        }
    )
    privacy = PrivacyRecord(
        target_epsilon=epsilon,
        epsilon_planned=epsilon,
        epsilon_spent=None,
        delta=DELTA,
        noise_multiplier=0.0,
        max_grad_norm=0.0,
        sample_rate=1.0,
        steps=0,
        steps_planned=0,
        unit="record",
        grid_version=acc.GRID_VERSION,
        zcdp_rho=rho,
        mechanism="mst",
    )
    job = Job(id="job_bench", dataset_id="ds_bench", spec=spec, privacy=privacy, attempts=1)
    dataset = Dataset(
        id="ds_bench",
        source={"builtin": "breast_cancer"},
        num_features=arrays.x_train.shape[1],
        num_train=len(arrays.y_train),
        num_test=len(arrays.y_test),
        classes={"labels": list(arrays.classes)},
        privacy_unit="record",
    )
    store = LocalStore(root)
    ending = synthesize_job(store, job, dataset, arrays)
    assert ending.artifacts is not None
    ref = ending.artifacts.get(REPORT)
    assert ref is not None
    report: dict[str, Any] = json.loads(b"".join(store.read_range(ref.key)))
    private: dict[str, Any] = report["private"]
    return private


def score(
    table: Table, real: dict[str, np.ndarray], synthetic: dict[str, np.ndarray], test: Any
) -> dict[str, Any]:
    x = table.decode(synthetic, np.random.default_rng(0))
    return {
        **marginal_distances(real, synthetic, table.sizes),
        "tstr_accuracy": tstr_accuracy(x, synthetic[LABEL], *test),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--no-job", action="store_true", help="leave out the ppml-job column (the worker's path)"
    )
    args = parser.parse_args()
    methods = ("ppml-mst", "mbi-star") if args.no_job else ("ppml-mst", "ppml-job", "mbi-star")
    scratch = Path(tempfile.mkdtemp(prefix="ppml-bench-synthetic-"))
    arrays = load_builtin("breast_cancer", secret="5e" * 16)
    names = arrays.feature_names[: args.features]
    bounds = builtin_bounds("breast_cancer", arrays.feature_names)
    table = Table(
        names=(*names, LABEL),
        bounds=tuple(bounds[n] for n in names),
        bins=args.bins,
        classes=tuple(arrays.classes),
    )
    x_train, x_test = arrays.x_train[:, : args.features], arrays.x_test[:, : args.features]
    real = table.encode(x_train, arrays.y_train)
    test = (x_test, arrays.y_test)
    rows = len(arrays.y_train)
    reference = tstr_accuracy(x_train, arrays.y_train, *test)
    results: list[dict[str, Any]] = []
    for epsilon, repeat in itertools.product(EPSILONS, range(args.repeats)):
        rho = calibrate_zcdp(target_epsilon=epsilon, delta=DELTA)
        for method in methods:
            start = time.perf_counter()
            if method == "ppml-job":
                figures = job_run(
                    arrays,
                    features=args.features,
                    bins=args.bins,
                    rho=rho,
                    epsilon=epsilon,
                    root=scratch / f"{epsilon}-{repeat}",
                )
                seconds = time.perf_counter() - start
            else:
                if method == "ppml-mst":
                    rng = np.random.default_rng(1000 + repeat)
                    synthetic, _ = synthesize(real, table.sizes, rho=rho, rows=rows, rng=rng)
                else:
                    synthetic = mbi_star(real, table.sizes, rho, rows, 1000 + repeat)
                seconds = time.perf_counter() - start
                figures = score(table, real, synthetic, test)
            results.append(
                {
                    "epsilon": epsilon,
                    "rho": rho,
                    "method": method,
                    "repeat": repeat,
                    "seconds": seconds,
                    **figures,
                }
            )
            print(f"ε={epsilon} {method}: {figures} ({seconds:.0f} s)", flush=True)
    header = ["ε", "method", "TV 1-way", "TV 2-way", "TSTR acc", "real acc", "seconds"]
    table_rows = [
        [
            r["epsilon"],
            r["method"],
            f"{r['tv_1way_mean']:.3f}",
            f"{r['tv_2way_mean']:.3f}",
            f"{r['tstr_accuracy']:.3f}",
            f"{reference:.3f}",
            f"{r['seconds']:.0f}",
        ]
        for r in results
    ]
    title = (
        f"breast_cancer, {args.features} features + label, {args.bins} bins, "
        f"{rows} training rows, δ={DELTA:g}"
    )
    print_table(title, header, table_rows)
    save(
        "synthetic",
        {
            "features": args.features,
            "bins": args.bins,
            "delta": DELTA,
            "rows": rows,
            "real_accuracy": reference,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
