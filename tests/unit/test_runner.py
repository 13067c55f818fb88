"""The job runner on its own: claim, train, publish, end; driven directly on the real
databases (SQLite and PostgreSQL), with tiny logistic regressions on the digits."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ppml.config import Settings
from ppml.datasets import load_builtin
from ppml.db.models import Dataset, Job, JobStatus, LedgerKind
from ppml.db.repositories import Repositories
from ppml.db.session import UNAVAILABLE, Database
from ppml.inference import load_model
from ppml.jobs import lifecycle
from ppml.jobs.heartbeat import Heartbeat
from ppml.jobs.reaper import Reaper
from ppml.jobs.records import ArtifactRef, Artifacts, Progress
from ppml.jobs.runner import ClaimUnavailable, JobRunner
from ppml.jobs.schedule import Schedule, unreported_steps
from ppml.privacy import accounting as acc
from ppml.privacy.budgets import budget_status
from ppml.privacy.evaluation import ExactScores
from ppml.queue import make_celery
from ppml.storage import ArtifactStore
from tests.unit.worlds import REPORT_EVERY, RunnerWorld, make_world, worker_settings


@pytest.fixture
def world(database: Database, settings: Settings) -> RunnerWorld:
    return make_world(database, worker_settings(settings))


def unreachable_url(kind: str, tmp_path: Path) -> str:
    """A database nothing answers for: a closed port, or a SQLite file in no directory."""
    if kind == "postgres":
        return "postgresql+psycopg://postgres@127.0.0.1:1/ppml?connect_timeout=2"
    return f"sqlite:///{tmp_path / 'no-such-directory' / 'ppml.db'}"


def publish_bytes(store: ArtifactStore, key: str, content: bytes) -> ArtifactRef:
    def write(path: Path) -> None:
        path.write_bytes(content)

    published = store.write(key, write)
    return ArtifactRef(key=published.key, sha256=published.sha256)


# ----------------------------------------------------------------------------- success


def test_a_queued_job_runs_to_success_and_publishes_its_first_attempts_model_files(
    world: RunnerWorld,
) -> None:
    # arrange
    job_id = world.submit(private=False)
    runner = JobRunner(world.db, world.settings, owner="worker-a")
    # act
    outcome = runner.run(job_id)
    # assert: succeeded, every planned step run, the files keyed by the attempt
    job = world.job(job_id)
    assert outcome == "succeeded" and job.status == JobStatus.SUCCEEDED
    assert job.attempts == 1 and job.lease_owner is None and job.finished_at is not None
    assert job.steps_done == world.plan(job_id).total_steps
    assert job.artifacts is not None and job.receipt is not None
    assert sorted(job.artifacts.formats()) == ["onnx", "safetensors"]
    for fmt in job.artifacts.formats():
        ref = job.artifacts.get(fmt)
        assert ref is not None
        assert ref.key == f"models/{job_id}.attempt-1.{fmt}"
        assert hashlib.sha256(world.store.path(ref.key).read_bytes()).hexdigest() == ref.sha256
    assert world.model_files(job_id) == [
        f"{job_id}.attempt-1.onnx",
        f"{job_id}.attempt-1.safetensors",
    ]
    assert job.receipt.job_id == job_id and job.receipt.dataset_id == job.dataset_id
    assert job.receipt.private is False and job.receipt.privacy is None
    assert job.receipt.metrics == job.metrics is not None
    # a public job is charged nothing, and a finished job keeps no checkpoint
    assert world.job_ledger(job_id) == []
    assert world.checkpoints(job_id) == []


def test_a_second_delivery_of_a_finished_job_is_skipped_and_changes_nothing(
    world: RunnerWorld,
) -> None:
    # arrange: the job ran once, on a budget
    job_id = world.submit(private=True)
    assert JobRunner(world.db, world.settings, owner="worker-a").run(job_id) == "succeeded"
    before = world.job(job_id)
    entries = [(e.id, e.kind) for e in world.job_ledger(job_id)]
    files = world.model_file_stamps(job_id)
    # act: the same message is delivered again, to another worker
    outcome = JobRunner(world.db, world.settings, owner="worker-b").run(job_id)
    # assert
    after = world.job(job_id)
    assert outcome == "skipped"
    assert after.status == JobStatus.SUCCEEDED and after.attempts == 1
    assert after.updated_at == before.updated_at and after.artifacts == before.artifacts
    assert after.privacy == before.privacy and after.receipt == before.receipt
    assert [(e.id, e.kind) for e in world.job_ledger(job_id)] == entries
    assert sorted(kind for _id, kind in entries) == ["commit", "release", "reserve"]
    assert world.model_file_stamps(job_id) == files


def test_a_job_cancelled_while_queued_is_skipped_without_touching_its_data(
    world: RunnerWorld,
) -> None:
    # arrange
    job_id = world.submit(private=True)
    world.service.cancel(world.tenant_id, job_id)
    # act
    outcome = JobRunner(world.db, world.settings).run(job_id)
    # assert: never claimed; the whole reservation went back at the cancel
    job = world.job(job_id)
    assert outcome == "skipped"
    assert job.status == JobStatus.CANCELLED and job.attempts == 0 and not job.data_touched
    assert sorted(e.kind for e in world.job_ledger(job_id)) == ["release", "reserve"]
    assert world.model_files(job_id) == []


def test_a_re_queued_job_publishes_its_model_under_its_second_attempt(world: RunnerWorld) -> None:
    # arrange: attempt 1's worker claims the job and vanishes; the reaper re-queues it
    job_id = world.submit(private=False)
    assert JobRunner(world.db, world.settings, owner="lost").claim(job_id) is not None
    world.expire_lease(job_id)
    reaper = Reaper(world.db, world.settings, make_celery(world.settings))
    assert reaper.run_once().requeued == [job_id]
    # act
    outcome = JobRunner(world.db, world.settings, owner="worker-b").run(job_id)
    # assert
    job = world.job(job_id)
    assert outcome == "succeeded" and job.attempts == 2
    assert job.artifacts is not None
    keys = {ref.key for ref in job.artifacts.root.values()}
    assert keys == {f"models/{job_id}.attempt-2.onnx", f"models/{job_id}.attempt-2.safetensors"}
    assert world.model_files(job_id) == [
        f"{job_id}.attempt-2.onnx",
        f"{job_id}.attempt-2.safetensors",
    ]


# ----------------------------------------------------------------------------- stopped short


class CancelAtFirstReport(JobRunner):
    """A runner whose job's cancel is requested (through the service) at its first report
    of progress past step 0, as an analyst's DELETE would arrive mid-run."""

    def __init__(self, world: RunnerWorld) -> None:
        super().__init__(world.db, world.settings, owner="worker-a")
        self.world = world
        self.cancelled_at: int | None = None

    def heartbeat(
        self, job_id: str, progress: Progress, steps: int, scores: ExactScores | None = None
    ) -> tuple[bool, bool]:
        if steps > 0 and self.cancelled_at is None:
            self.world.service.cancel(self.world.tenant_id, job_id)
            self.cancelled_at = steps
        return super().heartbeat(job_id, progress, steps, scores)


def test_a_cancel_requested_mid_run_ends_the_job_cancelled_charging_only_the_steps_run(
    world: RunnerWorld,
) -> None:
    # arrange
    job_id = world.submit(private=True)
    planned = world.plan(job_id).total_steps
    runner = CancelAtFirstReport(world)
    # act
    outcome = runner.run(job_id)
    # assert: stopped at the report that saw the cancel, well short of the plan
    job = world.job(job_id)
    assert outcome == "cancelled" and job.status == JobStatus.CANCELLED
    assert runner.cancelled_at == REPORT_EVERY < planned
    assert job.steps_done == REPORT_EVERY and job.progress.steps == REPORT_EVERY
    # charged the steps that ran (and its metric releases), the rest released
    entries = {e.kind: e for e in world.job_ledger(job_id)}
    assert sorted(entries) == ["commit", "release", "reserve"]
    commit = entries[LedgerKind.COMMIT]
    assert acc.MechanismEvent.from_dict(commit.event).steps == REPORT_EVERY
    assert acc.MechanismEvent.from_dict(entries[LedgerKind.RESERVE].event).steps == planned
    assert job.privacy is not None and job.privacy.steps == REPORT_EVERY
    assert job.privacy.ledger_entry_id == commit.id
    assert job.privacy.epsilon_spent == pytest.approx(job.privacy.spent(REPORT_EVERY))
    # models are published for succeeded jobs only; its checkpoint is gone too
    assert job.artifacts is None and job.receipt is None
    assert world.model_files(job_id) == []
    assert world.checkpoints(job_id) == []


class FailsAtSecondCheckpoint(JobRunner):
    """Training raises between two reports: the second checkpoint (at step 10) is written
    just before the progress report of step 10, so only step 5 was ever reported."""

    def _train(
        self,
        job: Job,
        dataset: Dataset,
        plan: Schedule,
        beat: Heartbeat,
        checkpoint: Callable[[dict[str, Any]], None],
        resume: dict[str, Any] | None,
    ) -> Any:
        saves: list[int] = []

        def failing(state: dict[str, Any]) -> None:
            saves.append(int(state["steps"]))
            if len(saves) == 2:
                raise FloatingPointError("the loss went to nan")
            checkpoint(state)

        return super()._train(job, dataset, plan, beat, failing, resume)


def test_a_training_exception_fails_the_job_charging_the_reported_steps_and_one_interval(
    world: RunnerWorld,
) -> None:
    # arrange
    job_id = world.submit(private=True)
    planned = world.plan(job_id).total_steps
    queued = world.job(job_id)
    expected = REPORT_EVERY + unreported_steps(queued.privacy, report_every=REPORT_EVERY)
    assert expected == 2 * REPORT_EVERY < planned
    # act
    outcome = FailsAtSecondCheckpoint(world.db, world.settings).run(job_id)
    # assert: failed, with a message that carries no data values
    job = world.job(job_id)
    assert outcome == "failed" and job.status == JobStatus.FAILED
    assert job.error is not None
    assert (job.error.code, job.error.message) == ("training_error", "FloatingPointError")
    # charged step 5 (reported) plus what may have run since (steps 6-10 did)
    entries = {e.kind: e for e in world.job_ledger(job_id)}
    assert sorted(entries) == ["commit", "release", "reserve"]
    assert acc.MechanismEvent.from_dict(entries[LedgerKind.COMMIT].event).steps == expected
    assert job.steps_done == expected
    assert job.privacy is not None and job.privacy.steps == expected
    assert job.privacy.ledger_entry_id == entries[LedgerKind.COMMIT].id
    assert job.artifacts is None and world.model_files(job_id) == []
    assert world.checkpoints(job_id) == []
    with world.db.session() as session:
        budget = Repositories(session).budget(job.dataset_id)
    assert budget is not None and budget_status(budget).epsilon_reserved == 0


def test_a_job_whose_data_cannot_be_read_fails_and_is_charged_one_reporting_interval(
    world: RunnerWorld,
) -> None:
    # arrange: the dataset's file is gone; the claim marks the data touched all the same
    job_id = world.submit(private=True)
    with world.db.session() as session:
        dataset = Repositories(session).dataset_by_id(world.job(job_id).dataset_id)
    assert dataset is not None
    world.store.delete(dataset.storage_key)
    # act
    outcome = JobRunner(world.db, world.settings).run(job_id)
    # assert: nothing was reported, so it is charged what may have run before a report
    job = world.job(job_id)
    assert outcome == "failed" and job.error is not None
    assert (job.error.code, job.error.message) == ("training_error", "MalformedFile")
    commit = next(e for e in world.job_ledger(job_id) if e.kind == LedgerKind.COMMIT)
    assert acc.MechanismEvent.from_dict(commit.event).steps == REPORT_EVERY == job.steps_done


def test_a_job_past_its_time_limit_fails_charged_the_steps_it_ran_without_a_model(
    database: Database, settings: Settings
) -> None:
    # arrange: a time limit already over when training starts
    world = make_world(database, worker_settings(settings, job_time_limit_s=0))
    job_id = world.submit(private=True)
    # act
    outcome = JobRunner(world.db, world.settings).run(job_id)
    # assert: stopped before its first step; only its metric releases are committed
    job = world.job(job_id)
    assert outcome == "failed" and job.error is not None
    assert job.error.code == "time_limit" and job.steps_done == 0
    entries = {e.kind: e for e in world.job_ledger(job_id)}
    event = acc.MechanismEvent.from_dict(entries[LedgerKind.COMMIT].event)
    assert event.steps == 0 and event.eval_releases > 0
    assert job.privacy is not None and job.privacy.ledger_entry_id == entries[LedgerKind.COMMIT].id
    assert job.artifacts is None and world.model_files(job_id) == []


def test_a_model_that_cannot_be_published_fails_the_job_at_once_charging_the_steps_run(
    world: RunnerWorld,
) -> None:
    # arrange: the store cannot take the model files (a file where their folder goes)
    job_id = world.submit(private=True)
    planned = world.plan(job_id).total_steps
    (world.store.root / "models").write_bytes(b"not a folder")
    # act
    outcome = JobRunner(world.db, world.settings).run(job_id)
    # assert: ended here, not left to the reaper; every step ran, so every step is charged
    job = world.job(job_id)
    assert outcome == "failed" and job.status == JobStatus.FAILED
    assert job.error is not None and job.error.code == "publish_error"
    assert job.lease_owner is None and job.artifacts is None
    commit = next(e for e in world.job_ledger(job_id) if e.kind == LedgerKind.COMMIT)
    assert acc.MechanismEvent.from_dict(commit.event).steps == planned


# ----------------------------------------------------------------------------- the database


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_claim_raises_claim_unavailable_when_the_database_is_unreachable(
    kind: str, tmp_path: Path
) -> None:
    # arrange: a real engine pointed where nothing answers
    settings = Settings(data_dir=tmp_path / "data", broker_url="memory://")
    db = Database(unreachable_url(kind, tmp_path))
    runner = JobRunner(db, settings, owner="worker-a")
    # act
    with pytest.raises(ClaimUnavailable) as raised:
        runner.claim("job_unreachable")
    db.dispose()
    # assert: the task retries such a claim later (it keeps the database's error)
    assert isinstance(raised.value.__cause__, UNAVAILABLE)
    assert "job_unreachable" in str(raised.value)


@pytest.mark.parametrize(("max_attempts", "reaped"), [(3, "queued"), (1, "failed")])
def test_a_finish_after_the_reaper_took_the_job_is_skipped_and_deletes_the_attempts_files(
    database: Database, settings: Settings, max_attempts: int, reaped: str
) -> None:
    # arrange: attempt 1 trains on while its lease runs out; the reaper re-queues the job
    # (attempts left) or settles it as lost (none left)
    world = make_world(database, worker_settings(settings, max_attempts=max_attempts))
    job_id = world.submit(private=True)
    runner = JobRunner(world.db, world.settings, owner="worker-a")
    claimed = runner.claim(job_id)
    assert claimed is not None
    job, _dataset = claimed
    world.expire_lease(job_id)
    Reaper(world.db, world.settings, make_celery(world.settings)).run_once()
    reaped_job = world.job(job_id)
    entries = [(e.id, e.kind) for e in world.job_ledger(job_id)]
    artifacts = Artifacts(
        {
            fmt: publish_bytes(world.store, f"models/{job_id}.attempt-1.{fmt}", b"weights")
            for fmt in ("safetensors", "onnx")
        }
    )
    ending = lifecycle.Ending(
        status=JobStatus.SUCCEEDED,
        steps=world.plan(job_id).total_steps,
        note="succeeded",
        artifacts=artifacts,
    )
    # act: the late worker finishes
    outcome = runner._finish(job, ending)
    # assert: nothing of the late attempt became the job's, and its files are gone
    after = world.job(job_id)
    assert reaped_job.status == reaped
    assert outcome == "skipped"
    assert after.status == reaped and after.updated_at == reaped_job.updated_at
    assert after.artifacts is None and after.privacy == reaped_job.privacy
    assert [(e.id, e.kind) for e in world.job_ledger(job_id)] == entries
    assert world.model_files(job_id) == []


def test_a_finish_that_cannot_reach_the_database_within_a_lease_is_left_to_the_reaper(
    database: Database, settings: Settings, tmp_path: Path
) -> None:
    # arrange: the job is claimed; then the worker's database goes away for longer than
    # its lease (0 s here, so the finish gives up after its first try)
    world = make_world(database, worker_settings(settings))
    job_id = world.submit(private=True)
    claimed = JobRunner(world.db, world.settings, owner="worker-a").claim(job_id)
    assert claimed is not None
    job, _dataset = claimed
    dead = Database(unreachable_url("sqlite", tmp_path))
    cut_off = JobRunner(dead, worker_settings(settings, lease_seconds=0), owner="worker-a")
    ref = publish_bytes(world.store, f"models/{job_id}.attempt-1.safetensors", b"weights")
    ending = lifecycle.Ending(
        status=JobStatus.SUCCEEDED,
        steps=world.plan(job_id).total_steps,
        note="succeeded",
        artifacts=Artifacts({"safetensors": ref}),
    )
    # act
    outcome = cut_off._finish(job, ending)
    dead.dispose()
    # assert: the files are discarded; the row is untouched, running under its lease
    after = world.job(job_id)
    assert outcome == "lost"
    assert not world.store.exists(ref.key)
    assert after.status == JobStatus.RUNNING and after.lease_owner == "worker-a"
    assert sorted(e.kind for e in world.job_ledger(job_id)) == ["reserve"]


def test_the_runner_beats_before_training_so_progress_is_known_from_the_start(
    world: RunnerWorld,
) -> None:
    # arrange: a runner whose training records what the job row said when it began
    seen: dict[str, Any] = {}

    class Observing(JobRunner):
        def _train(self, job: Job, *rest: Any) -> Any:
            seen["row"] = world.job(job.id)
            return super()._train(job, *rest)

    job_id = world.submit(private=True)
    # act
    outcome = Observing(world.db, world.settings).run(job_id)
    # assert: a lost worker is charged from its reports, never from "unknown"
    assert outcome == "succeeded"
    row = seen["row"]
    assert row.status == JobStatus.RUNNING and row.heartbeat_at is not None
    assert row.steps_done == 0 and row.data_touched


# ----------------------------------------------------------------------------- images


def test_a_dp_cnn2d_job_on_digits_trains_on_its_8x8_images_and_serves_them_by_onnx(
    world: RunnerWorld,
) -> None:
    # arrange: digits declare their [1, 8, 8] shape; the job names none
    cnn2d = {"arch": "cnn2d", "channels": [8, 16], "kernel_size": 3}
    job_id = world.submit(private=True, epochs=2, model=cnn2d, learning_rate=1.0)
    runner = JobRunner(world.db, world.settings, owner="worker-a")

    # act
    outcome = runner.run(job_id)

    # assert: the ONNX graph takes the flat 64-value rows the predict endpoint is sent, and
    # the model learnt under DP (accuracy on all of digits, trained rows included: well
    # above chance, 0.1)
    job = world.job(job_id)
    assert outcome == "succeeded", job.error
    assert job.receipt is not None and job.receipt.architecture["input_shape"] == [1, 8, 8]
    ref = job.artifacts.get("onnx") if job.artifacts else None
    assert ref is not None
    served = load_model(world.store.path(ref.key), sha256=ref.sha256)
    assert (served.num_features, served.num_classes) == (64, 10)
    digits = load_builtin("digits")
    x, y = (
        np.concatenate([digits.x_train, digits.x_test]),
        np.concatenate([digits.y_train, digits.y_test]),
    )
    accuracy = float((served.predict(x).indices == y).mean())
    assert accuracy > 0.5, accuracy
