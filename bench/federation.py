"""A federation job over local ``ppml node`` processes against the in-process simulation (#16).

    python bench/federation.py [--nodes 3 10] [--rounds 3] [--rows 200] [--json PATH] [--keep DIR]
        [--sim-threads 1]

For each node count N: MNIST-1D (built-in generator) is split into N IID shards of
``--rows`` rows, each written to its own CSV; a real stack runs (PostgreSQL, Redis,
``ppml serve --no-worker``, one ``ppml worker``) with N ``ppml node run`` processes, each
with its own data directory, enrolled in a record federation. One sample-level job (ε = 4,
MLP 40-256-256-10, batch 32, one local epoch) runs its rounds over them. Its time is measured
from the opening of its first round (the first task row) to its end (``finished_at``, which
includes publishing the model), so the nodes' start-up and the job's queueing are not in it.

The simulation (``train_federated``, 'column' partition over the same shards, the noise of
each node's plan) runs the same rounds in this process. Overhead per round = (remote time −
simulated time) / rounds: polling, transfers, the database and the nodes' own processes.
Every process shares this machine's cores, so the N nodes train in parallel only as far as
there are cores for them. Each node trains on one torch thread (``ppml node run``'s default),
and so does the simulation (``--sim-threads``): on a loaded machine torch's spinning threads
made the simulation 3-4 times slower at 2 threads than at 1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BIN, postgres_database, print_table, save, stack

REDIS = os.environ.get("PPML_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
HIDDEN, BATCH, LR, EPSILON = [256, 256], 32, 0.1, 4.0


def _shards(nodes: int, rows: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    from ppml.datasets import load_builtin

    arrays = load_builtin("mnist1d", seed=0, secret="00" * 32)
    x, y = arrays.x_train.reshape(len(arrays.y_train), -1), arrays.y_train
    if nodes * rows > len(y):
        raise SystemExit(f"MNIST-1D has {len(y)} training rows, not {nodes}×{rows}")
    return [
        (x[i * rows : (i + 1) * rows], y[i * rows : (i + 1) * rows]) for i in range(nodes)
    ], x.shape[1]


def _spec(federation_id: str, rounds: int) -> dict[str, Any]:
    return {
        "name": "bench-federation",
        "model": {"arch": "mlp", "hidden_sizes": HIDDEN},
        "training": {"epochs": 1, "batch_size": BATCH, "learning_rate": LR, "seed": 0},
        "privacy": {
            "target_epsilon": EPSILON,
            "delta": 1e-5,
            "max_grad_norm": 1.0,
            "level": "sample",
        },
        "federated": {"federation_id": federation_id, "rounds": rounds, "round_timeout_s": 120},
    }


def _remote(nodes: int, rounds: int, rows: int, root: Path) -> dict[str, float]:
    shards, features = _shards(nodes, rows)
    names = [f"x{i}" for i in range(features)]
    schema = {"classes": [str(k) for k in range(10)], "features": names}
    with postgres_database() as url, ExitStack() as exits:
        env = {"PPML_WORKER__QUEUE": f"bench-{secrets.token_hex(4)}"}
        service = exits.enter_context(
            stack(root, database_url=url, broker_url=REDIS, workers=1, env=env)
        )
        client = exits.enter_context(service.client(service.tenant()))
        federation = client.post(
            "/v1/federations", json={"name": "bench", "schema": schema, "privacy_unit": "record"}
        ).json()
        node_env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
        for i, (x, y) in enumerate(shards):
            folder = root / f"node{i}"
            folder.mkdir()
            frame = pd.DataFrame(x, columns=names)
            frame["label"] = y
            frame.to_csv(folder / "rows.csv", index=False)
            token = client.post(
                f"/v1/federations/{federation['id']}/nodes", json={"name": f"n{i}"}
            ).json()["enrolment_token"]
            command = [
                str(BIN / "ppml"), "node", "run", "--server", service.base, "--enrol", token,
                "--data", str(folder / "rows.csv"), "--target", "label",
                "--data-dir", str(folder / "data"), "--epsilon", "10", "--delta", "1e-4",
                "--poll-wait", "5",
            ]  # fmt: skip
            with (folder / "node.log").open("ab") as log:
                proc = subprocess.Popen(command, env=node_env, stdout=log, stderr=subprocess.STDOUT)
            exits.callback(proc.kill)
        deadline = time.monotonic() + 600
        while True:
            listed = client.get(f"/v1/federations/{federation['id']}").json()["nodes"]
            if sum(n["status"] == "active" for n in listed) == nodes:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"nodes did not enrol: {listed}")
            time.sleep(0.5)
        job_id = client.post("/v1/jobs", json=_spec(federation["id"], rounds)).json()["id"]
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            time.sleep(0.3)
        assert job["status"] == "succeeded", job
        engine = create_engine(url)
        with engine.connect() as conn:
            opened = conn.execute(
                text(
                    "SELECT round, MIN(created_at) FROM federation_tasks WHERE job_id = :j "
                    "GROUP BY round ORDER BY round"
                ),
                {"j": job_id},
            ).all()
        engine.dispose()
    finished = datetime.fromisoformat(job["finished_at"]).replace(tzinfo=None)
    first = opened[0][1].replace(tzinfo=None)
    rounds_s = [(b[1] - a[1]).total_seconds() for a, b in itertools.pairwise(opened)]
    rounds_s.append((finished - opened[-1][1].replace(tzinfo=None)).total_seconds())
    return {
        "seconds": (finished - first).total_seconds(),
        "round_p50_s": float(np.median(rounds_s)),
    }


def _simulated(nodes: int, rounds: int, rows: int, threads: int) -> float:
    import torch

    from ppml.federation.privacy import node_sample_plan
    from ppml.specs import JobSpec, ModelSpec
    from ppml.training import TrainingPlan
    from ppml.training.federated import FederatedDP, FederatedPlan, train_federated

    shards, _ = _shards(nodes, rows)
    x = np.concatenate([s[0] for s in shards])
    y = np.concatenate([s[1] for s in shards])
    spec = JobSpec.model_validate(_spec("fed_bench", rounds))
    node = node_sample_plan(spec, rows)
    plan = TrainingPlan(
        model=ModelSpec(arch="mlp", hidden_sizes=HIDDEN),
        epochs=1,
        batch_size=BATCH,
        learning_rate=LR,
        optimizer="sgd",
        seed=0,
        steps_per_epoch=1,
        total_steps=1,
    )
    fed = FederatedPlan(
        num_clients=nodes,
        clients_per_round=nodes,
        rounds=rounds,
        local_epochs=1,
        partition="column",
        alpha=1.0,
        strategy="fedavg",
        mu=0.0,
        server_learning_rate=1.0,
        dropout=0.0,
    )
    dp = FederatedDP(
        level="sample",
        noise_multiplier=node.noise_multiplier,
        clip_norm=1.0,
        sample_rate=node.sample_rate,
        delta=node.delta,
    )
    torch.set_num_threads(threads)  # as each node trains (ppml node run --threads)
    started = time.perf_counter()
    train_federated(
        x_train=x,
        y_train=y,
        x_test=x[:100],
        y_test=y[:100],
        num_classes=10,
        clients_train=np.repeat(np.arange(nodes), rows),
        plan=plan,
        fed=fed,
        dp=dp,
        dp_seed=0,
        device="cpu",
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200, help="rows per node")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--sim-threads", type=int, default=1, help="torch threads of the simulation (nodes: 1)"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the logs (API, worker, nodes) under this dir"
    )
    args = parser.parse_args()
    results, table = [], []
    for nodes in args.nodes:
        if args.keep is not None:
            root = args.keep / f"nodes{nodes}"
            root.mkdir(parents=True)
            remote = _remote(nodes, args.rounds, args.rows, root)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                remote = _remote(nodes, args.rounds, args.rows, Path(tmp))
        simulated = _simulated(nodes, args.rounds, args.rows, args.sim_threads)
        overhead = (remote["seconds"] - simulated) / args.rounds
        row = {
            "nodes": nodes,
            "rounds": args.rounds,
            "rows_per_node": args.rows,
            "remote_s": remote["seconds"],
            "remote_round_p50_s": remote["round_p50_s"],
            "remote_rounds_per_s": args.rounds / remote["seconds"],
            "simulated_s": simulated,
            "simulation_threads": args.sim_threads,
            "simulated_rounds_per_s": args.rounds / simulated,
            "overhead_per_round_s": overhead,
        }
        results.append(row)
        table.append(
            [
                nodes,
                args.rounds,
                row["remote_rounds_per_s"],
                row["remote_round_p50_s"],
                row["simulated_rounds_per_s"],
                overhead,
            ]
        )
    print_table(
        f"federation job over local ppml node processes vs the simulation "
        f"(MNIST-1D, MLP {HIDDEN}, {args.rows} rows/node, sample-level ε={EPSILON}, "
        f"{os.cpu_count()} cores)",
        [
            "nodes",
            "rounds",
            "remote rounds/s",
            "remote round p50 s",
            "sim rounds/s",
            "overhead/round s",
        ],
        table,
    )
    save("federation", {"results": results, "cores": os.cpu_count()}, args.json)


if __name__ == "__main__":
    main()
