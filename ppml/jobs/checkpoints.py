"""Where a job's training checkpoints live: one file per attempt in the artifact store
(the data dir, or the object store that workers on other machines share).

Each attempt (claim) of a job writes its own file, ``checkpoints/<job>.<attempt>.pt``,
so a worker that lost its lease but has not noticed yet can never overwrite the
checkpoint of the worker that owns the job now. A new attempt resumes from the newest
attempt's file; every file of a job goes when the job ends. The store seals them at rest
(``checkpoints/`` is a sealed kind), so a checkpoint is read through a decrypted copy.
Torch is imported only when a file is read or written (the API and the reaper import this
module too).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ppml.storage import ArtifactStore

__all__ = ["JobCheckpoints"]

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(?P<job>[A-Za-z0-9_-]+)\.(?P<attempt>\d+)\.pt$")


class JobCheckpoints:
    """The checkpoint files of one job."""

    def __init__(self, store: ArtifactStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id

    def key(self, attempt: int) -> str:
        return f"checkpoints/{self.job_id}.{attempt}.pt"

    def attempts(self) -> list[int]:
        """Attempts that left a checkpoint, newest first."""
        found = []
        for key in self.store.list("checkpoints", f"{self.job_id}."):
            match = _FILE.match(key.removeprefix("checkpoints/"))
            if match and match["job"] == self.job_id:
                found.append(int(match["attempt"]))
        return sorted(found, reverse=True)

    def save(self, attempt: int, state: dict[str, Any]) -> None:
        """Write through the store (atomically): a crash leaves the previous file."""
        from ppml.training.checkpoint import save_checkpoint

        self.store.write(self.key(attempt), lambda path: save_checkpoint(path, state))

    def latest(self, *, before: int) -> dict[str, Any] | None:
        """The newest readable checkpoint of an attempt earlier than ``before``."""
        from ppml.training.checkpoint import load_checkpoint

        for attempt in self.attempts():
            if attempt >= before:
                continue
            try:
                with self.store.open_plain(self.key(attempt)) as path:
                    return load_checkpoint(path)
            except Exception:
                # Unreadable: the next older one is still a valid point to resume from.
                log.exception("job %s: checkpoint of attempt %d unreadable", self.job_id, attempt)
        return None

    def clear(self) -> None:
        for attempt in self.attempts():
            self.store.delete(self.key(attempt))
