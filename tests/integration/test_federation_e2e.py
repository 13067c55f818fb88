"""A whole federation, end to end, as real processes (#16): the API and a Celery worker on
PostgreSQL and Redis, and ``ppml node run`` processes, each with its own data directory and
its own non-IID CSV shard of digits.

* sample level (record federation, 4 nodes): one node's budget is too small (it refuses; its
  ledger is untouched; the receipt says so), one node is killed with ``kill -9`` mid-job and
  restarted from its data dir (it rejoins); the job succeeds on quorum, its model scores
  within 0.9× of the in-process simulation over the same shards, each node's own ledger
  holds exactly the ε the receipt gives it, no request of a node carries more than an
  update and its envelope, and no row of a node's file is anywhere in the service's data
  directory or database.
* client level (client federation with a budget, 3 nodes): the federation's ledger charges
  exactly the receipt's ε, once; the nodes charge nothing.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine

from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.federation.privacy import node_sample_plan
from ppml.specs import JobSpec
from tests.conftest import REDIS_URL, _pg_database
from tests.integration.federation_stack import (
    SCHEMA,
    FederationStack,
    Shards,
    csv_lines,
    digits_shards,
    wait_until,
    write_shard,
)
from tests.integration.stack import (
    BIN,
    free_port,
    process,
    service_env,
    tenant_client,
    wait_for_status,
    wait_ready,
)

ADMIN = "federation-e2e-admin-token-0123456789"
ROUNDS, TIMEOUT_S = 6, 8
TRAINING = {"epochs": 1, "batch_size": 32, "learning_rate": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def shards() -> Shards:
    return digits_shards()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_admin: Engine, pg_template: str
) -> Iterator[FederationStack]:
    root = tmp_path_factory.mktemp("federation")
    port = free_port()
    with _pg_database(pg_admin, template=pg_template) as url, ExitStack() as exits:
        env = service_env(
            root / "data",
            PPML_ADMIN_TOKEN=ADMIN,
            PPML_DATABASE_URL=url,
            PPML_BROKER_URL=REDIS_URL,
            PPML_WORKER__QUEUE=f"training-{secrets.token_hex(4)}",
        )
        api_log = root / "api.log"
        api = exits.enter_context(
            process([str(BIN / "ppml"), "serve", "--no-worker", "--port", str(port)], env, api_log)
        )
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api, api_log)
        exits.enter_context(process([str(BIN / "ppml"), "worker"], env, root / "worker.log"))
        owner = tenant_client(base, ADMIN)
        yield FederationStack(base, env, root, url, owner, exits)


def _federation(stack: FederationStack, name: str, **extra: Any) -> dict[str, Any]:
    body = {"name": name, "schema": SCHEMA, **extra}
    answer = stack.owner.post("/v1/federations", json=body)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def _active(stack: FederationStack, federation_id: str, count: int) -> None:
    def active() -> bool:
        nodes = stack.owner.get(f"/v1/federations/{federation_id}").json()["nodes"]
        return sum(n["status"] == "active" for n in nodes) == count

    logs = lambda: "\n".join(n.log.read_text()[-2000:] for n in stack.nodes.values())  # noqa: E731
    wait_until(active, 180, logs)


def _tasks(stack: FederationStack, job_id: str) -> list[tuple[str, int, str, str | None]]:
    """(node name, round, status, detail) of each of the job's tasks."""
    db = Database(stack.database_url)
    try:
        with db.session() as session:
            repos = Repositories(session)
            job = repos.job_by_id(job_id)
            assert job is not None
            fed = repos.federation_by_id(str(job.spec.federation_id))
            assert fed is not None
            names = {n.id: n.name for n in repos.federation_nodes([fed.id])}
            return [
                (names[t.node_id], t.round, t.status, t.detail)
                for r in range(ROUNDS)
                for t in repos.round_tasks(job_id, r)
            ]
    finally:
        db.dispose()


def _simulated_accuracy(shards: Shards, spec: JobSpec) -> float:
    """The in-process simulation over the same three shards ('column' partition), same
    settings, its noise calibrated as each node's is; the mean over three seeds."""
    from ppml.specs import ModelSpec
    from ppml.training import TrainingPlan
    from ppml.training.federated import FederatedDP, FederatedPlan, train_federated

    x = np.concatenate([x for x, _ in shards.train])
    y = np.concatenate([y for _, y in shards.train])
    clients = np.repeat(np.arange(3), [len(y) for _, y in shards.train])
    node = node_sample_plan(spec, len(shards.train[0][1]))
    plan = TrainingPlan(
        model=ModelSpec(arch="logreg"),
        epochs=1,
        batch_size=TRAINING["batch_size"],
        learning_rate=TRAINING["learning_rate"],
        optimizer="sgd",
        seed=0,
        steps_per_epoch=1,
        total_steps=1,
    )
    fed = FederatedPlan(
        num_clients=3,
        clients_per_round=3,
        rounds=ROUNDS,
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
        clip_norm=node.max_grad_norm,
        sample_rate=node.sample_rate,
        delta=node.delta,
    )
    scores = [
        train_federated(
            x_train=x,
            y_train=y,
            x_test=shards.x_test,
            y_test=shards.y_test,
            num_classes=10,
            clients_train=clients,
            plan=plan,
            fed=fed,
            dp=dp,
            dp_seed=seed,
            device="cpu",
        ).metrics["test_accuracy"]
        for seed in range(3)
    ]
    return float(np.mean(scores))


def _model_accuracy(stack: FederationStack, job_id: str, shards: Shards) -> float:
    import torch

    from ppml.training.export import load_model

    answer = stack.owner.get(f"/v1/jobs/{job_id}/model")
    assert answer.status_code == 200, answer.text
    path = stack.root / f"{job_id}.safetensors"
    path.write_bytes(answer.content)
    module, _ = load_model(path)
    with torch.no_grad():
        predicted = module(torch.from_numpy(shards.x_test)).argmax(dim=1).numpy()
    return float((predicted == shards.y_test).mean())


def test_sample_level_job_over_four_node_processes(stack: FederationStack, shards: Shards) -> None:
    # arrange: a record federation; nodes a, b, c hold the non-IID shards, d a small budget
    federation = _federation(stack, "clinics", privacy_unit="record")
    files = [
        write_shard(stack.root / f"{name}.csv", x, y)
        for name, (x, y) in zip("abc", shards.train, strict=True)
    ]
    files.append(write_shard(stack.root / "d.csv", *shards.extra))
    for name, data in zip("abcd", files, strict=True):
        token = stack.invite(federation["id"], name)
        stack.node(name, data, epsilon=1.0 if name == "d" else 10.0, token=token)
    _active(stack, federation["id"], 4)
    d_ledger_before = stack.nodes["d"].ledger_dump()
    spec = {
        "name": "fed-sample",
        "model": {"arch": "logreg"},
        "training": TRAINING,
        "privacy": {"target_epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0, "level": "sample"},
        "federated": {
            "federation_id": federation["id"],
            "rounds": ROUNDS,
            "round_timeout_s": TIMEOUT_S,
            "quorum": 2,
        },
    }

    # act: the job; node a is killed mid-job (after its second update), misses a round's
    # deadline, and comes back from its data dir without a token
    answer = stack.owner.post("/v1/jobs", json=spec)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    a = stack.nodes["a"]
    wait_until(
        lambda: a.log.read_text().count("update accepted") >= 2,
        180,
        lambda: a.log.read_text()[-3000:] + stack.owner.get(f"/v1/jobs/{job_id}").text,
    )
    stack.kill("a")
    wait_until(
        lambda: any(n == "a" and s == "expired" for n, _, s, _ in _tasks(stack, job_id)),
        120,
        lambda: repr(_tasks(stack, job_id)),
    )
    stack.node("a", a.data, epsilon=a.epsilon, token=None)
    job = wait_for_status(stack.owner, job_id, {"succeeded", "failed", "cancelled"}, timeout=300)

    # assert: the job succeeded on quorum; a's expired round and its later accepted ones
    assert job["status"] == "succeeded", job
    tasks = _tasks(stack, job_id)
    expired = min(r for n, r, s, _ in tasks if n == "a" and s == "expired")
    assert any(n == "a" and r > expired and s == "accepted" for n, r, s, _ in tasks), tasks
    for name in "bc":
        assert [s for n, _, s, _ in tasks if n == name] == ["accepted"] * ROUNDS, tasks
    # d refused its first task for its budget, and was asked nothing more
    d_tasks = [(s, detail or "") for n, _, s, detail in tasks if n == "d"]
    assert len(d_tasks) == 1 and d_tasks[0][0] == "refused", d_tasks
    assert d_tasks[0][1].startswith("budget: would spend ε="), d_tasks
    assert stack.nodes["d"].ledger_dump() == d_ledger_before  # its ledger is unchanged

    # the receipt: each node's ε is what its own ledger holds (b and c), never less (a: the
    # server counts a round from the node's fetch of its weights, so a kill between that
    # fetch and the node's charge counts one round the node never charged); d's refusal
    receipt = stack.owner.get(f"/v1/jobs/{job_id}/receipt")
    assert receipt.status_code == 200, receipt.text
    signed = receipt.json()["receipt"]  # what the signature binds, the receipt among it
    nodes = {n["name"]: n for n in signed["receipt"]["nodes"]}
    for name in "bc":
        assert nodes[name]["epsilon"] == stack.nodes[name].ledger_epsilon(1e-5)
    a = stack.nodes["a"]  # the process started again, on the same data dir and ledger
    assert nodes["a"]["epsilon"] >= a.ledger_epsilon(1e-5)
    assert a.charged_rounds() <= nodes["a"]["rounds"] <= a.charged_rounds() + 1
    # a's rounds: every round it delivered, at most every round it was asked (the expired one
    # counts when a fetched its weights before the kill, so a may count all of them)
    a_tasks = [s for n, _, s, _ in tasks if n == "a"]
    assert a_tasks.count("accepted") <= nodes["a"]["rounds"] <= len(a_tasks)
    assert nodes["b"]["rounds"] == ROUNDS
    assert nodes["d"]["rounds"] == 0 and nodes["d"]["epsilon"] == 0
    assert nodes["d"]["refused"].startswith("budget: would spend ε="), nodes["d"]

    # the model scores within 0.9× of the simulation over the same shards
    accuracy = _model_accuracy(stack, job_id, shards)
    simulated = _simulated_accuracy(shards, JobSpec.model_validate(spec))
    print(f"accuracy {accuracy:.3f}, simulated {simulated:.3f}")  # shown with -s
    assert accuracy >= 0.9 * simulated, (accuracy, simulated)

    # the data stayed home: no request is larger than an update and its envelope …
    update_bytes = (64 * 10 + 10) * 4  # logreg on 64 features, 10 classes, float32
    envelope = 1024
    for node in stack.nodes.values():
        sent = node.sent()
        assert sent, node.log.read_text()[-2000:]
        largest = max(size for _, _, size in sent)
        print(f"node {node.name}: {len(sent)} requests, largest body {largest} bytes")
        assert largest <= update_bytes + envelope, (node.name, largest)
        uploads = [size for method, path, size in sent if path.endswith("/update")]
        assert all(size >= update_bytes for size in uploads), (node.name, uploads)
    # … and no row of any node's file is in the service's files or database
    _assert_no_row_stored(stack, files)


def _row_patterns(path: Path) -> list[bytes]:
    """What would betray a row: its CSV line, and its features as float32 and float64 bytes."""
    patterns = []
    for line in csv_lines(path):
        patterns.append(line.encode())
        values = [float(v) for v in line.split(",")[:-1]]
        if sum(v != 0 for v in values) >= 8:  # a row of mostly zeros is no fingerprint
            patterns.append(struct.pack(f"<{len(values)}f", *values))
            patterns.append(struct.pack(f"<{len(values)}d", *values))
    return patterns


def _assert_no_row_stored(stack: FederationStack, files: list[Path]) -> None:
    patterns = [p for path in files for p in _row_patterns(path)]
    stored = list(stack.stored_plaintexts())
    assert any(key.startswith("federations/") for key, _ in stored)  # the updates were read
    for key, content in stored:
        for pattern in patterns:
            assert pattern not in content, (key, pattern[:80])
    database = stack.database_text().encode()
    for pattern in patterns:
        assert pattern not in database, pattern[:80]


def test_client_level_job_charges_the_federation_budget_once(
    stack: FederationStack, shards: Shards
) -> None:
    # arrange: the sample-level test's nodes stop; a client-unit federation with a budget
    # and three new nodes on the same shards
    for name, node in stack.nodes.items():
        if node.proc is not None and node.proc.poll() is None:
            stack.kill(name)
    federation = _federation(
        stack, "regions", privacy_unit="client", budget={"epsilon": 8.0, "delta": 1e-3}
    )
    for name, (x, y) in zip(["e", "f", "g"], shards.train, strict=True):
        data = write_shard(stack.root / f"{name}.csv", x, y)
        stack.node(name, data, epsilon=10.0, token=stack.invite(federation["id"], name))
    _active(stack, federation["id"], 3)
    spec = {
        "name": "fed-client",
        "model": {"arch": "logreg"},
        "training": TRAINING,
        "privacy": {"target_epsilon": 2.0, "delta": 1e-3, "max_grad_norm": 1.0, "level": "client"},
        "federated": {"federation_id": federation["id"], "rounds": 3, "round_timeout_s": TIMEOUT_S},
    }

    # act
    answer = stack.owner.post("/v1/jobs", json=spec)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    job = wait_for_status(stack.owner, job_id, {"succeeded", "failed", "cancelled"}, timeout=300)

    # assert: the federation's ledger charged exactly the receipt's ε, once
    assert job["status"] == "succeeded", job
    signed = stack.owner.get(f"/v1/jobs/{job_id}/receipt").json()["receipt"]
    epsilon = signed["privacy"]["epsilon"]
    assert signed["receipt"]["privacy_unit"] == "client" and signed["receipt"]["nodes"] is None
    assert epsilon == pytest.approx(job["privacy"]["epsilon_spent"], rel=1e-12)
    assert 0 < epsilon <= 2.0
    budget = stack.owner.get(f"/v1/federations/{federation['id']}").json()["budget"]
    assert budget["epsilon_reserved"] == 0
    assert budget["epsilon_spent_composed"] == pytest.approx(epsilon, rel=1e-9)
    db = Database(stack.database_url)
    try:
        with db.session() as session:
            repos = Repositories(session)
            entries = repos.ledger_entries(answer.json()["dataset_id"])
    finally:
        db.dispose()
    # the reservation, one commit, and the release of what the reservation held beyond it
    kinds = [(e.kind, e.job_id) for e in entries]
    assert kinds == [("reserve", job_id), ("commit", job_id), ("release", job_id)]
    assert entries[1].id == signed["privacy"]["ledger_entry_id"]
    assert [e["id"] for e in signed["ledger"]["entries"]] == [e.id for e in entries]
    assert entries[1].epsilon == pytest.approx(epsilon, rel=1e-9)
    # the nodes trusted the server with the noise: their own ledgers charged nothing
    for name in "efg":
        assert stack.nodes[name].ledger_epsilon(1e-3) == 0.0
