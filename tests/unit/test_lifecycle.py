"""The job lifecycle: one transition table, one place that changes a status, and a heartbeat
that trains through short database outages."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy.exc import OperationalError

from ppml.db.models import Job, JobStatus
from ppml.db.repositories import Repositories
from ppml.jobs import lifecycle
from ppml.jobs.heartbeat import Heartbeat
from ppml.jobs.records import Progress
from ppml.privacy.evaluation import ExactScores
from ppml.training.plans import Progress as TrainingProgress

ROOT = Path(__file__).resolve().parents[2]

EXPECTED = {
    ("queued", "running"),  # a worker claims it
    ("queued", "cancelled"),  # cancelled before it ran
    ("running", "queued"),  # its worker was lost: back in the queue
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
}


def test_the_transition_table_is_exactly_the_documented_one() -> None:
    table = {(a.value, b.value) for a, targets in lifecycle.TRANSITIONS.items() for b in targets}
    assert table == EXPECTED
    assert set(lifecycle.TRANSITIONS) == set(JobStatus)


class _Events:
    """The repository's event log, as ``move`` sees it."""

    def __init__(self) -> None:
        self.appended: list[tuple[str, str, dict[str, object]]] = []

    def append_job_event(self, job_id: str, kind: str, data: dict[str, object]) -> int:
        self.appended.append((job_id, str(kind), data))
        return len(self.appended)


@pytest.mark.parametrize(("current", "target"), itertools.product(JobStatus, JobStatus))
def test_move_allows_exactly_the_table_and_records_each_move(
    current: JobStatus, target: JobStatus
) -> None:
    # arrange
    job = Job(id="job_1", status=current, lease_owner="w", lease_expires_at=None)
    events = _Events()
    repos = cast(Repositories, events)
    # act / assert
    if (current.value, target.value) in EXPECTED:
        lifecycle.move(repos, job, target)
        assert job.status == target
        assert (job.finished_at is not None) == target.terminal
        assert events.appended == [("job_1", "status", {"status": target.value})]
    else:
        with pytest.raises(lifecycle.IllegalTransition):
            lifecycle.move(repos, job, target)
        assert job.status == current
        assert events.appended == []


def _status_writes(tree: ast.AST) -> list[int]:
    """Lines that set a job's status: ``x.status = ...``, ``Job(status=...)`` or an SQL
    ``.values(status=...)`` (the lifecycle's ``Ending(status=...)`` only asks for one)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            value = "" if node.value is None else ast.unparse(node.value)
            if any(kind in value for kind in ("DatasetStatus", "NodeStatus", "TaskStatus")):
                continue  # a dataset's ingestion status, a federation node's or task's
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Attribute) and leaf.attr == "status":
                        lines.append(node.lineno)
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("values", "Job"):
                lines += [k.lineno for k in node.keywords if k.arg == "status"]
    return lines


def test_no_status_is_assigned_outside_the_lifecycle() -> None:
    # A status change anywhere else would bypass the table (and the ledger's settlement).
    lifecycle_file = ROOT / "ppml" / "jobs" / "lifecycle.py"
    offenders = []
    for folder in ("ppml", "api", "worker"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "ppml" / "client.py":  # an HTTP status there, not a job's
                continue
            source = path.read_text()
            for number in _status_writes(ast.parse(source)):
                line = source.splitlines()[number - 1].strip()
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line}")
    allowed = {o for o in offenders if o.startswith(str(lifecycle_file.relative_to(ROOT)))}
    # the repository's conditional claim writes the status the lifecycle hands it
    allowed |= {o for o in offenders if o.endswith("status=status,")}
    # federation tasks' statuses (ppml.db.federations.TaskStatus), not a job's
    tasks = "ppml/db/repositories/federations.py"
    allowed |= {
        o
        for o in offenders
        if o.startswith(tasks) and ("values(status=status" in o or "status=TaskStatus." in o)
    }
    assert sorted(set(offenders) - allowed) == []
    assert any("lifecycle.py" in o for o in allowed)  # the check sees assignments at all


class _Outage:
    """A heartbeat target: the database answers, then is down, then answers again."""

    def __init__(self) -> None:
        self.down = False
        self.beats = 0
        self.scores: list[ExactScores | None] = []  # what each beat that got through carried

    def __call__(
        self, job_id: str, progress: Progress, steps: int, scores: ExactScores | None
    ) -> tuple[bool, bool]:
        if self.down:
            raise OperationalError("UPDATE jobs", {}, Exception("connection refused"))
        self.beats += 1
        self.scores.append(scores)
        return True, False


def _beating(monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], _Outage, Heartbeat]:
    """A heartbeat with a 30 s lease, its database, and a clock moved by hand."""
    clock = [1000.0]
    monkeypatch.setattr("ppml.jobs.heartbeat.time.monotonic", lambda: clock[0])
    target = _Outage()
    beat = Heartbeat(
        target,
        "job_1",
        deadline=clock[0] + 3600,
        lease_seconds=30.0,
        last=Progress(fraction=0.0, epoch=0, steps=0),
        last_beat=clock[0],
        last_renewal=clock[0],
        started=clock[0],
    )
    return clock, target, beat


def test_a_report_says_the_time_left_at_the_claims_pace_and_carries_scores_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # arrange: a claim that started at 0, and a clock we move by hand
    clock, target, beat = _beating(monkeypatch)
    scores = {"test_accuracy": 0.5, "test_loss": 1.0, "rows": 10.0, "units": 10.0}
    # act: a quarter done after 10 s (scored: an epoch end), then half after 20 s
    clock[0] += 10.0
    beat.on_progress(TrainingProgress(steps_done=25, epoch=1, fraction=0.25, scores=scores))
    first, sent = beat.last, list(target.scores)
    clock[0] += 10.0
    beat.on_progress(TrainingProgress(steps_done=50, epoch=2, fraction=0.5))
    # assert: 30 s left, then 20 s; the scores went with the first beat only, with the epoch
    assert first.eta_seconds == 30.0 and beat.last.eta_seconds == 20.0
    assert [s.epoch if s else None for s in sent] == [1]
    assert target.scores == [sent[0], None] and sent[0] is not None
    assert sent[0].test_accuracy == 0.5


def test_a_database_outage_shorter_than_the_lease_does_not_stop_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # arrange: a 30 s lease and a clock we move by hand
    clock, target, beat = _beating(monkeypatch)
    # act: the database goes down for 25 s (renewals due every 10 s fail)
    target.down = True
    for _ in range(5):
        clock[0] += 5.0
        assert beat.should_stop() is False
    target.down = False
    clock[0] += 11.0
    # assert: training went on, and the next renewal reached the database
    assert beat.should_stop() is False
    assert target.beats == 1 and not beat.lost


def test_an_outage_longer_than_the_lease_gives_the_job_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock, target, beat = _beating(monkeypatch)
    target.down = True
    stopped = False
    for _ in range(10):
        clock[0] += 5.0
        stopped = stopped or beat.should_stop()
    # the reaper may have handed the job to another worker by now
    assert stopped and beat.lost
