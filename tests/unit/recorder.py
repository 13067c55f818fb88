"""Training callbacks for tests: record progress, and stop after a number of checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Recorder:
    """Callbacks that record progress and stop after ``stop_after`` ``should_stop`` checks
    (one check per step, or per round for federated training)."""

    stop_after: int | None = None
    progress: list[Any] = field(default_factory=list)
    checks: int = 0

    def on_progress(self, progress: Any) -> None:
        self.progress.append(progress)

    def should_stop(self) -> bool:
        self.checks += 1
        return self.stop_after is not None and self.checks > self.stop_after
