"""A running job's heartbeat: progress to the job row under the lease, cancellation back.

A database outage shorter than the lease does not stop training: a beat that cannot reach
the database is skipped and tried again at the next report or renewal. Only when no beat
has reached the database for a whole lease does the worker give the job up, since the
reaper may by then have handed it to another worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ppml.db.session import UNAVAILABLE
from ppml.jobs.records import Progress
from ppml.jobs.schedule import Schedule
from ppml.privacy.evaluation import ExactScores, exact_metrics
from ppml.telemetry import TRAINING_STEPS

if TYPE_CHECKING:
    from ppml.training.plans import Progress as TrainingProgress

__all__ = ["Heartbeat", "progress_at"]

log = logging.getLogger(__name__)

#: ``(job_id, progress, steps, scores) -> (still the owner, cancel requested)``; may raise an
#: outage. ``scores``: exact held-out figures scored since the last beat that got through.
Beat = Callable[[str, Progress, int, ExactScores | None], tuple[bool, bool]]


def progress_at(
    steps: int, schedule: Schedule, *, local_epochs: int | None, epsilon: float | None = None
) -> Progress:
    """The progress of a job after ``steps`` steps (``local_epochs``: federated jobs)."""
    fraction = round(min(1.0, steps / schedule.total_steps), 6)
    if local_epochs is None:
        epoch, round_ = steps // schedule.steps_per_epoch, None
    else:
        round_ = steps // schedule.steps_per_epoch
        epoch = round_ * local_epochs
    return Progress(
        fraction=fraction, epoch=epoch, round=round_, steps=steps, epsilon_spent=epsilon
    )


@dataclass
class Heartbeat:
    """Training callbacks (``on_progress``, ``should_stop``) of one job attempt (claim)."""

    beat_fn: Beat
    job_id: str
    deadline: float
    lease_seconds: float
    last: Progress
    epsilon_of: Callable[[int], float | None] = lambda _steps: None
    steps_reported: int = 0
    scores: ExactScores | None = None  # scored at a report, not yet recorded
    cancel: bool = False
    lost: bool = False
    timed_out: bool = False
    # Fair sharing: after ``time_slice`` seconds of this claim, a report at which
    # ``contended()`` (another tenant's job waits for a worker) stops training (``preempted``).
    time_slice: float | None = None
    contended: Callable[[], bool] = lambda: False
    preempted: bool = False
    started: float = field(default_factory=time.monotonic)
    last_contention_check: float = 0.0
    last_beat: float = field(default_factory=time.monotonic)  # last try
    last_renewal: float = field(default_factory=time.monotonic)  # last one that reached the db
    first_fraction: float = field(init=False, default=0.0)  # where this claim started

    def __post_init__(self) -> None:
        self.first_fraction = self.last.fraction

    @property
    def renew_every(self) -> float:
        """A third of the lease, so one missed beat is survivable."""
        return self.lease_seconds / 3

    def on_progress(self, progress: TrainingProgress) -> None:
        # Throughput for operators: steps since the last report (a resumed job from its
        # checkpoint's), added to ppml_training_steps_total.
        ran = progress.steps_done - max(self.steps_reported, self.last.steps)
        if ran > 0:
            TRAINING_STEPS.inc(ran)
        self.steps_reported = progress.steps_done
        self.last = Progress(
            fraction=round(progress.fraction, 6),
            epoch=progress.epoch,
            round=getattr(progress, "round", None),
            steps=progress.steps_done,
            epsilon_spent=self.epsilon_of(progress.steps_done),
            eta_seconds=self._eta(progress.fraction),
        )
        if progress.scores is not None:
            scored = exact_metrics(progress.scores)
            self.scores = scored.model_copy(update={"epoch": progress.epoch})
        self.beat()
        self._yield_if_contended()

    def _eta(self, fraction: float) -> float | None:
        """Time left at this claim's pace (the fraction it started from is its resume point)."""
        done = fraction - self.first_fraction
        if done <= 0 or fraction >= 1:
            return None
        return round((time.monotonic() - self.started) * (1 - fraction) / done, 1)

    def _yield_if_contended(self) -> None:
        """At a report (the checkpoint was just written): preempted when this claim has had
        its time slice and another tenant waits. Asked at most once a second."""
        if self.time_slice is None or self.cancel or self.lost or self.preempted:
            return
        now = time.monotonic()
        if now - self.started < self.time_slice or now - self.last_contention_check < 1.0:
            return
        self.last_contention_check = now
        try:
            self.preempted = self.contended()
        except UNAVAILABLE:
            log.warning("job %s: the database is unavailable; training on", self.job_id)

    def beat(self) -> None:
        """Report the last progress and renew the lease; learn of cancellation."""
        now = time.monotonic()
        self.last_beat = now
        try:
            owner, cancel = self.beat_fn(self.job_id, self.last, self.steps_reported, self.scores)
        except UNAVAILABLE:
            log.warning("job %s: the database is unavailable; training on", self.job_id)
            self.lost = now - self.last_renewal > self.lease_seconds
            return
        self.last_renewal = now
        self.lost, self.cancel, self.scores = not owner, cancel, None

    def should_stop(self) -> bool:
        """Checked before every step: cheap, except a lease renewal every few seconds."""
        now = time.monotonic()
        if now > self.deadline:
            self.timed_out = True
        if now - self.last_beat > self.renew_every:
            self.beat()
        return self.cancel or self.lost or self.timed_out or self.preempted
