"""A node's data directory: ``node.json`` (the server, the node's credential, the last schema
the server gave it; mode 0600) and ``ledger.sqlite`` (its privacy ledger)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_DATA_DIR", "NodeConfig", "ledger_path", "load_config", "save_config"]

DEFAULT_DATA_DIR = Path(".ppml-node")
_CONFIG = "node.json"
_LEDGER = "ledger.sqlite"


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """What a node keeps between starts. ``credential`` is a secret (``ppml_node_…``)."""

    server: str
    fingerprint_key: str  # hex: keys the local data's fingerprint in the ledger
    node_id: str | None = None
    credential: str | None = None
    federation_id: str | None = None
    schema: dict[str, Any] | None = None
    privacy_unit: str | None = None

    @property
    def enrolled(self) -> bool:
        return self.credential is not None

    def with_(self, **changes: Any) -> NodeConfig:
        return replace(self, **changes)


def ledger_path(data_dir: Path) -> Path:
    return data_dir / _LEDGER


def load_config(data_dir: Path) -> NodeConfig | None:
    """The data directory's ``node.json``, or None before the first start."""
    path = data_dir / _CONFIG
    if not path.exists():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    known = {k: raw[k] for k in NodeConfig.__dataclass_fields__ if k in raw}
    return NodeConfig(**known)


def save_config(data_dir: Path, config: NodeConfig) -> None:
    """Write ``node.json`` readable by its owner only (0600), atomically (write and rename)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / _CONFIG
    temp = data_dir / f".{_CONFIG}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(asdict(config), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(temp, 0o600)  # an existing temp file kept its mode: set it again
    os.replace(temp, path)
