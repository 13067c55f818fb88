"""Following a job from its server-sent events: a live bar with loss, accuracy, ε and ETA.

The stream (``GET /v1/jobs/{id}/events``) numbers its events; the follower remembers the last
id it was sent and, when the connection drops or the server ends a long stream, resumes after
it with ``Last-Event-ID``, so nothing is missed or shown twice. Ctrl-C stops the follower, not
the job, and prints the command that re-attaches (``ppml jobs watch ID --after N``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from ppml.cli.common import err, fail
from ppml.client import PPMLClient

__all__ = ["TERMINAL", "Follower", "eta_seconds", "progress_detail"]

TERMINAL = ("succeeded", "failed", "cancelled")
_LOSS = ("loss", "train_loss", "test_loss")
_ACCURACY = ("accuracy", "test_accuracy", "train_accuracy")


def _first(values: dict[str, Any], names: tuple[str, ...]) -> float | None:
    for name in names:
        value = values.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _figure(progress: dict[str, Any], names: tuple[str, ...]) -> float | None:
    """A figure of the latest report: in the progress itself or its ``metrics``."""
    metrics = progress.get("metrics")
    found = _first(progress, names)
    if found is None and isinstance(metrics, dict):
        found = _first(metrics, names)
    return found


def eta_seconds(
    progress: dict[str, Any], first: tuple[float, float] | None, now: float
) -> float | None:
    """Seconds left: the server's estimate if the report carries one (``eta_seconds``), else the
    pace since the follower's first report ``first`` = (time, fraction) carried forward."""
    reported = progress.get("eta_seconds", progress.get("eta_s"))
    if isinstance(reported, int | float) and not isinstance(reported, bool):
        return max(0.0, float(reported))
    fraction = progress.get("fraction")
    if first is None or not isinstance(fraction, int | float):
        return None
    started, start_fraction = first
    done = float(fraction) - start_fraction
    if done <= 0 or now <= started:
        return None
    return (now - started) * (1.0 - float(fraction)) / done


def _clock(value: float) -> str:
    seconds = round(value)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_detail(
    spec: dict[str, Any],
    progress: dict[str, Any],
    epsilon: float | None,
    eta: float | None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """``epoch 3/15  loss 0.41  acc 0.87  ε 1.204  ETA 0:42`` (what is known so far): loss
    and accuracy of the latest report, else of the job's released ``metrics``."""
    federated = spec.get("federated")
    if federated:
        where = f"round {progress.get('round') or 0}/{federated.get('rounds', '?')}"
    else:
        where = f"epoch {progress.get('epoch', 0)}/{spec.get('training', {}).get('epochs', '?')}"
    parts = [where]
    released = metrics or {}
    loss = _figure(progress, _LOSS)
    accuracy = _figure(progress, _ACCURACY)
    loss = _first(released, _LOSS) if loss is None else loss
    accuracy = _first(released, _ACCURACY) if accuracy is None else accuracy
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if accuracy is not None:
        parts.append(f"acc {accuracy:.4g}")
    parts.append("ε -" if epsilon is None else f"ε {epsilon:.3f}")
    if eta is not None:
        parts.append(f"ETA {_clock(eta)}")
    return "  ".join(parts)


@dataclass
class Follower:
    """Follows one job's events until it ends; ``last_id`` is where a re-attach resumes."""

    client: PPMLClient
    job: dict[str, Any]
    last_id: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    _first: tuple[float, float] | None = None

    def run(self, *, timeout: float | None, retry_s: float) -> dict[str, Any]:
        """Shows the live bar until the job ends; returns the job as the stream's ``end``
        event carries it. A dropped connection is resumed after ``retry_s``."""
        deadline = time.monotonic() + timeout if timeout else None
        spec = self.job.get("spec") or {}
        columns = (
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=30),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
        )
        self.progress = dict(self.job.get("progress") or {})
        with Progress(*columns, console=err()) as bar:
            task = bar.add_task(self.job["status"], total=1.0, detail="")

            def draw() -> None:
                now = time.monotonic()
                eta = None if self.job["status"] in TERMINAL else self._eta(now)
                bar.update(
                    task,
                    description=self.job["status"],
                    completed=float(self.progress.get("fraction") or 0.0),
                    detail=progress_detail(
                        spec, self.progress, self._epsilon(), eta, self.job.get("metrics")
                    ),
                )

            draw()
            while True:
                try:
                    for event in self.client.job_events(self.job["id"], after=self.last_id):
                        if self._apply(event.id, event.name, event.data):
                            draw()
                            return self.job
                        draw()
                        if deadline is not None and time.monotonic() > deadline:
                            fail(f"gave up waiting after {timeout:g} s; the job goes on")
                except httpx.TransportError:
                    pass  # resumed below, after the last event received
                if deadline is not None and time.monotonic() > deadline:
                    fail(f"gave up waiting after {timeout:g} s; the job goes on")
                time.sleep(retry_s)

    def _apply(self, event_id: str | None, name: str, data: Any) -> bool:
        """Takes one event in; True once the stream has ended the job."""
        if event_id is not None:
            self.last_id = event_id
        if name == "status" and isinstance(data, dict):
            self.job["status"] = data.get("status", self.job["status"])
        elif name == "progress" and isinstance(data, dict):
            self.progress = data
            fraction = data.get("fraction")
            if self._first is None and isinstance(fraction, int | float):
                self._first = (time.monotonic(), float(fraction))
        elif name == "end" and isinstance(data, dict):
            self.job = data
            self.progress = dict(data.get("progress") or self.progress)
            return True
        return False

    def _eta(self, now: float) -> float | None:
        return eta_seconds(self.progress, self._first, now)

    def _epsilon(self) -> float | None:
        privacy = self.job.get("privacy") or {}
        if privacy.get("epsilon_spent") is not None:
            return float(privacy["epsilon_spent"])
        spent = self.progress.get("epsilon_spent")
        return None if spent is None else float(spent)
