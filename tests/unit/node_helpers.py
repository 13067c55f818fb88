"""What the node tests share: small local data files and a node's ledger on a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ppml.node.data import LocalData, load_local
from ppml.node.ledger import LocalLedger, new_fingerprint_key

SCHEMA = {"classes": ["no", "yes"], "features": ["a", "b", "c", "d"]}


def write_csv(path: Path, *, rows: int = 200, columns: str = "abcd", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.uniform(0, 1, size=(rows, len(columns))), columns=list(columns))
    frame["label"] = np.where(frame[columns[0]] > 0.5, "yes", "no")
    frame.to_csv(path, index=False)
    return path


def local_data(tmp_path: Path, **kwargs: object) -> LocalData:
    path = write_csv(tmp_path / "data.csv", **kwargs)  # type: ignore[arg-type]
    return load_local(path, target="label", schema=SCHEMA)


KEY = bytes.fromhex(new_fingerprint_key())


def open_ledger(
    tmp_path: Path,
    data: LocalData,
    *,
    epsilon: float | None = 4.0,
    delta: float | None = 1e-3,
) -> LocalLedger:
    return LocalLedger.open(
        tmp_path / "ledger.sqlite",
        fingerprint_key=KEY,
        data=data,
        epsilon=epsilon,
        delta=delta,
        name="test-node",
    )
