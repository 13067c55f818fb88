"""A whole federation as real processes (#16): PostgreSQL, Redis, ``ppml serve --no-worker``,
a ``ppml worker`` and ``ppml node run`` processes, each node with its own data directory and
its own CSV shard of scikit-learn's digits (non-IID: most of a node's rows come from one
group of labels). A held-out test set never leaves the test.

Also what the assertions read: a node's log of what it sent, its ledger file, and every file
of the service's data directory and every row of its database as plain text.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pandas as pd
from sqlalchemy import create_engine, inspect, text

from ppml.config import Settings
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.privacy import accounting as acc
from ppml.storage import ArtifactStore
from tests.integration.stack import BIN, process, service_env

FEATURES = [f"p{i}" for i in range(64)]
SCHEMA = {"classes": [str(k) for k in range(10)], "features": FEATURES}
GROUPS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])  # label → the node whose labels they mostly are
SHARD_ROWS, OWN_ROWS, TEST_ROWS = 400, 300, 360


@dataclass(frozen=True)
class Shards:
    """Three non-IID training shards, a fourth node's rows and the held-out set."""

    train: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]
    extra: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


def digits_shards() -> Shards:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = (bunch.data / 16).astype(np.float32), bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    x_test, y_test, x, y = x[:TEST_ROWS], y[:TEST_ROWS], x[TEST_ROWS:], y[TEST_ROWS:]
    groups, used = GROUPS[y], np.zeros(len(y), bool)
    picked: list[list[int]] = []
    for k in range(3):  # OWN_ROWS of its own labels, then the rest from the other groups
        mine = np.flatnonzero((groups == k) & ~used)[:OWN_ROWS]
        used[mine] = True
        picked.append(list(mine))
    for k in range(3):
        others = np.flatnonzero(~used & (groups != k))[: SHARD_ROWS - len(picked[k])]
        used[others] = True
        picked[k] += list(others)
    rest = np.flatnonzero(~used)[:200]
    train = [(x[np.array(p)], y[np.array(p)]) for p in picked]
    return Shards(train=train, extra=(x[rest], y[rest]), x_test=x_test, y_test=y_test)


def write_shard(path: Path, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> Path:
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["label"] = y
    frame.to_csv(path, index=False)
    return path


def csv_lines(path: Path) -> list[str]:
    """The data lines of a shard file exactly as written (no header)."""
    return path.read_text().splitlines()[1:]


# --- processes ----------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    data: Path
    data_dir: Path
    log: Path
    epsilon: float
    proc: subprocess.Popen[bytes] | None = None

    def sent(self) -> list[tuple[str, str, int]]:
        """(method, path, body bytes) of every request the node logged."""
        found = re.findall(r"sent (\w+) (\S+): (\d+) bytes", self.log.read_text())
        return [(m, p, int(n)) for m, p, n in found]

    def ledger_epsilon(self, delta: float) -> float:
        """ε this node's own ledger holds: all its commits' curves composed at ``delta``."""
        entries = self._commits()
        if not entries:
            return 0.0
        curve = np.sum([e.rdp["units"] for e in entries], axis=0)
        return float(acc.epsilon(tuple(int(v) for v in curve), delta))

    def charged_rounds(self) -> int:
        """The rounds this node charged its own ledger for (one commit each)."""
        return len(self._commits())

    def _commits(self) -> list[Any]:
        db = Database(f"sqlite:///{self.data_dir / 'ledger.sqlite'}")
        try:
            with db.session() as session:
                repos = Repositories(session)
                tenant = repos.tenant_by_name("local")
                assert tenant is not None
                (dataset,), _ = repos.list_datasets(tenant.id, page_size=1, page_token=None)
                return [e for e in repos.ledger_entries(dataset.id) if e.kind == "commit"]
        finally:
            db.dispose()

    def ledger_dump(self) -> list[tuple[Any, ...]]:
        """Every ledger entry and budget row of the node's ledger file."""
        engine = create_engine(f"sqlite:///{self.data_dir / 'ledger.sqlite'}")
        try:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT * FROM ledger_entries")).all()
                budgets = conn.execute(text("SELECT * FROM dataset_budgets")).all()
            return [tuple(r) for r in [*rows, *budgets]]
        finally:
            engine.dispose()


@dataclass
class FederationStack:
    base: str
    env: dict[str, str]
    root: Path
    database_url: str
    owner: httpx.Client
    exits: ExitStack
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return Settings(data_dir=self.root / "data", database_url=self.database_url)

    def node(self, name: str, data: Path, *, epsilon: float, token: str | None) -> Node:
        """Start ``ppml node run`` (enrolling with ``token``, or coming back without it)."""
        node = self.nodes.get(name)
        if node is None:
            folder = self.root / "nodes" / name
            folder.mkdir(parents=True, exist_ok=True)
            node = Node(name, data, folder / "data", folder / "node.log", epsilon)
            self.nodes[name] = node
        command = [
            str(BIN / "ppml"), "node", "run", "--server", self.base, "--data", str(node.data),
            "--target", "label", "--data-dir", str(node.data_dir), "--epsilon",
            str(node.epsilon), "--delta", "1e-4", "--name", name, "--poll-wait", "2",
        ]  # fmt: skip
        if token is not None:
            command += ["--enrol", token]
        env = service_env(self.root / "nodes" / name / "env")
        node.proc = self.exits.enter_context(process(command, env, node.log))
        return node

    def kill(self, name: str) -> None:
        proc = self.nodes[name].proc
        assert proc is not None and proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def invite(self, federation_id: str, name: str) -> str:
        answer = self.owner.post(f"/v1/federations/{federation_id}/nodes", json={"name": name})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["enrolment_token"])

    def stored_plaintexts(self) -> Iterator[tuple[str, bytes]]:
        """Every file under the service's data directory, plain: a stored artefact through
        the store (sealed kinds are decrypted), anything else as it lies on disk."""
        store = ArtifactStore.for_settings(self.settings)
        data_dir = self.root / "data"
        for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
            key = path.relative_to(data_dir).as_posix()
            if key.count("/") == 1 and store.exists(key):
                with store.open_plain(key) as plain:
                    yield key, plain.read_bytes()
            else:
                yield key, path.read_bytes()

    def database_text(self) -> str:
        """Every row of every table of the service's database, as text."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                parts = []
                for table in inspect(conn).get_table_names():
                    for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                        parts.append(f"{table}: {tuple(row)!r}")
            return "\n".join(parts)
        finally:
            engine.dispose()


def wait_until(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting: {what()}")
