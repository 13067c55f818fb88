"""Running one job on a worker: claim, train, publish the model, settle the ledger.

Idempotent by construction: a job is claimed with a conditional update, so a duplicate
delivery of the same message finds it taken (or finished) and does nothing; the ledger's
idempotency keys make a retried settlement harmless.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from ppml import datasets as data
from ppml.config import Settings
from ppml.db.models import Dataset, Job, JobStatus, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.jobs.checkpoints import JobCheckpoints
from ppml.jobs.receipts import receipt_metadata
from ppml.jobs.schedule import Schedule, evaluation_plan, schedule, unreported_steps
from ppml.privacy import accounting as acc
from ppml.privacy.evaluation import (
    DEFAULT_LOSS_CLIP,
    EvaluationPlan,
    ReleasedMetrics,
    release_outcome,
)
from ppml.privacy.ledger import Ledger
from ppml.specs import JobSpec
from ppml.storage import ArtifactStore

if TYPE_CHECKING:
    from ppml.training.dp_sgd import Progress, TrainResult
    from ppml.training.federated import FederatedResult

    Outcome = TrainResult | FederatedResult

__all__ = ["JobRunner", "worker_identity"]

log = logging.getLogger(__name__)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class _Heartbeat:
    """Training callbacks: progress to the job row under the lease, and cancellation."""

    runner: JobRunner
    job_id: str
    deadline: float
    renew_every: float  # seconds: a third of the lease, so one missed beat is survivable
    last: dict[str, Any]
    steps_reported: int = 0
    cancel: bool = False
    lost: bool = False
    timed_out: bool = False
    last_beat: float = field(default_factory=time.monotonic)

    def on_progress(self, progress: Progress) -> None:
        self.steps_reported = progress.steps_done
        self.last = {
            "fraction": round(progress.fraction, 6),
            "epoch": progress.epoch,
            "round": getattr(progress, "round", None),
            "steps": progress.steps_done,
        }
        self.beat()

    def beat(self) -> None:
        """Report the last progress and renew the lease; learn of cancellation."""
        owner, cancel = self.runner.heartbeat(self.job_id, self.last, self.steps_reported)
        self.last_beat = time.monotonic()
        self.lost = not owner
        self.cancel = cancel

    def should_stop(self) -> bool:
        """Checked before every step: cheap, except a lease renewal every few seconds."""
        now = time.monotonic()
        if now > self.deadline:
            self.timed_out = True
        if now - self.last_beat > self.renew_every:
            self.beat()
        return self.cancel or self.lost or self.timed_out


class JobRunner:
    """Runs jobs for one worker process."""

    def __init__(self, db: Database, settings: Settings, *, owner: str | None = None) -> None:
        self.db, self.settings = db, settings
        self.owner = owner or worker_identity()
        self.store = ArtifactStore(settings.data_dir)

    def _lease_until(self) -> Any:
        return utcnow() + timedelta(seconds=self.settings.worker.lease_seconds)

    def heartbeat(self, job_id: str, progress: dict[str, Any], steps: int) -> tuple[bool, bool]:
        with self.db.session(write=True) as session:
            return Repositories(session).heartbeat(
                job_id,
                owner=self.owner,
                lease_until=self._lease_until(),
                progress=progress,
                steps=steps,
            )

    def claim(self, job_id: str) -> tuple[Job, Dataset] | None:
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            job = repos.job_by_id(job_id)
            if job is None or job.status != JobStatus.QUEUED:
                return None
            if not repos.claim_job(job_id, owner=self.owner, lease_until=self._lease_until()):
                return None
            job = repos.job_by_id(job_id)
            dataset = repos.dataset_by_id(job.dataset_id) if job else None
        assert job is not None and dataset is not None
        return job, dataset

    def run(self, job_id: str) -> str:
        """Run ``job_id`` if it is still queued; returns the final status or ``"skipped"``."""
        claimed = self.claim(job_id)
        if claimed is None:
            log.info("job %s is not queued; nothing to do", job_id)
            return "skipped"
        job, dataset = claimed
        spec = JobSpec.model_validate(job.spec)
        limit = spec.training.max_runtime_s or self.settings.worker.job_time_limit_s
        limit = min(limit, self.settings.worker.job_time_limit_s)  # per attempt
        plan = schedule(spec, dataset)  # the same schedule the job was priced with
        total = plan.total_steps
        checkpoints = JobCheckpoints(self.store, job.id)
        # A re-run (the reaper re-queued it after its worker was lost) resumes from the
        # newest checkpoint; without one it starts over (see JobCheckpoints).
        resume = checkpoints.latest(before=job.attempts) if job.attempts > 1 else None
        start = int(resume["steps"]) if resume is not None else 0
        log.info("job %s claimed (attempt %d), starting at step %d", job_id, job.attempts, start)
        # Progress is "known" from the first beat on: a lost worker is charged what it
        # reported plus one reporting interval instead of its whole reservation.
        beat = _Heartbeat(
            self,
            job_id,
            deadline=time.monotonic() + limit,
            renew_every=self.settings.worker.lease_seconds / 3,
            last=_progress(start, plan, spec),
            steps_reported=start,
        )
        beat.beat()

        def save_checkpoint(state: dict[str, Any]) -> None:
            if not beat.lost:  # a worker that lost the job keeps its hands off
                checkpoints.save(job.attempts, state)

        try:
            result = self._train(job, dataset, spec, plan, beat, save_checkpoint, resume)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            report_every = self.settings.worker.report_every_steps
            unreported = unreported_steps(job.privacy or {}, report_every=report_every)
            steps = min(total, beat.steps_reported + unreported)
            failure = {"code": "training_error", "message": type(exc).__name__}
            return self._finish(job, JobStatus.FAILED, steps=steps, schedule=plan, error=failure)
        if beat.lost:
            log.warning("job %s: lease lost; another worker owns it now", job_id)
            return "lost"
        status = JobStatus.SUCCEEDED
        error: dict[str, Any] | None = None
        if result.stopped and beat.cancel:
            status = JobStatus.CANCELLED
        elif result.stopped and beat.timed_out:
            status = JobStatus.FAILED
            error = {"code": "time_limit", "message": f"stopped after {limit} s"}
        released = release_outcome(
            result.metrics, getattr(result, "history", None), self._evaluation(job, spec, dataset)
        )
        artifacts = None
        if status != JobStatus.FAILED:
            artifacts = self._save_model(job, dataset, spec, result, released.metrics)
        return self._finish(
            job,
            status,
            steps=result.steps_done,
            schedule=plan,
            error=error,
            result=result,
            released=released,
            artifacts=artifacts,
        )

    @staticmethod
    def _evaluation(job: Job, spec: JobSpec, dataset: Dataset) -> EvaluationPlan:
        """How this job's metrics are released: as priced (private jobs), else by its data."""
        if job.privacy is not None:
            return EvaluationPlan.from_dict(job.privacy.get("evaluation"))
        return evaluation_plan(spec, dataset)

    def _scoring_arrays(self, dataset: Dataset, arrays: data.DatasetArrays) -> dict[str, Any]:
        """The rows that score the model: the owner's public validation set when the dataset
        has one (all its rows), else the held-out split, with each row's privacy unit."""
        if dataset.validation_dataset_id is None:
            units = arrays.clients_test if dataset.privacy_unit == "client" else None
            return {"x_test": arrays.x_test, "y_test": arrays.y_test, "test_units": units}
        with self.db.session() as session:
            public = Repositories(session).dataset_by_id(dataset.validation_dataset_id)
        assert public is not None and public.epsilon_total is None
        scoring = data.load_arrays(self.store.path(public.storage_key))
        x = np.ascontiguousarray(np.concatenate([scoring.x_train, scoring.x_test]))
        y = np.concatenate([scoring.y_train, scoring.y_test])
        return {"x_test": x, "y_test": y, "test_units": None}

    def _train(
        self,
        job: Job,
        dataset: Dataset,
        spec: JobSpec,
        schedule: Schedule,
        beat: _Heartbeat,
        checkpoint: Callable[[dict[str, Any]], None],
        resume: dict[str, Any] | None,
    ) -> TrainResult | FederatedResult:
        from ppml.training.dp_sgd import TrainingPlan  # torch: worker only

        arrays = data.load_arrays(self.store.path(dataset.storage_key))
        scoring = self._scoring_arrays(dataset, arrays)
        loss_clip = spec.privacy.evaluation.loss_clip if spec.privacy else DEFAULT_LOSS_CLIP
        plan = TrainingPlan(
            arch=spec.model.arch,
            hidden_sizes=tuple(spec.model.hidden_sizes),
            channels=tuple(spec.model.channels),
            kernel_size=spec.model.kernel_size,
            epochs=spec.training.epochs if spec.federated is None else 1,
            batch_size=spec.training.batch_size,
            learning_rate=spec.training.learning_rate,
            optimizer=spec.training.optimizer,
            momentum=spec.training.momentum,
            seed=spec.training.seed,
            steps_per_epoch=schedule.steps_per_epoch if spec.federated is None else 1,
            total_steps=schedule.total_steps if spec.federated is None else 1,
            eval_loss_clip=loss_clip,
            test_units=scoring["test_units"],
        )
        private = job.privacy if spec.privacy is not None else None
        common: dict[str, Any] = {
            "x_train": arrays.x_train,
            "y_train": arrays.y_train,
            "x_test": scoring["x_test"],
            "y_test": scoring["y_test"],
            "num_classes": arrays.num_classes,
            "plan": plan,
            "callbacks": beat,
            "checkpoint": checkpoint,
            "resume": resume,
        }
        if spec.federated is not None:
            return self._train_federated(spec, private, arrays, common, dataset.split_secret)
        from ppml.training.dp_sgd import DPPlan, train

        dp = None
        if private is not None and spec.privacy is not None:
            dp = DPPlan(
                noise_multiplier=float(private["noise_multiplier"]),
                max_grad_norm=spec.privacy.max_grad_norm,
                sample_rate=float(private["sample_rate"]),
                delta=float(private["delta"]),
            )
        return train(**common, dp=dp, report_every=self.settings.worker.report_every_steps)

    @staticmethod
    def _train_federated(
        spec: JobSpec,
        private: dict[str, Any] | None,
        arrays: data.DatasetArrays,
        common: dict[str, Any],
        secret: str | None,
    ) -> FederatedResult:
        from ppml.training.federated import FederatedDP, FederatedPlan, train_federated

        fed = spec.federated
        assert fed is not None
        dp = None
        if private is not None and spec.privacy is not None:
            dp = FederatedDP(
                level=spec.privacy.level,
                noise_multiplier=float(private["noise_multiplier"]),
                clip_norm=spec.privacy.max_grad_norm,
                sample_rate=float(private["sample_rate"]),
                delta=float(private["delta"]),
            )
        plan = FederatedPlan(
            num_clients=fed.num_clients,
            clients_per_round=fed.clients_per_round,
            rounds=fed.rounds,
            local_epochs=fed.local_epochs,
            partition=fed.partition.scheme,
            alpha=fed.partition.alpha,
            strategy=fed.strategy,
            mu=fed.mu,
            server_learning_rate=fed.server_learning_rate,
            dropout=fed.dropout,
        )
        keyed: dict[str, Any] = {}
        if fed.partition.scheme != "column":  # placed by keyed hashes of each record alone
            if secret is None:
                raise ValueError("the dataset has no split secret to key its partition with")
            keys, partition_seed = data.partition_keys(
                secret,
                scheme=fed.partition.scheme,
                seed=spec.training.seed,
                x=arrays.x_train,
                labels=np.asarray(arrays.classes)[arrays.y_train],
            )
            keyed = {"record_keys": keys, "partition_seed": partition_seed}
        return train_federated(
            **common, clients_train=arrays.clients_train, fed=plan, dp=dp, **keyed
        )

    def _save_model(
        self,
        job: Job,
        dataset: Dataset,
        spec: JobSpec,
        result: Outcome,
        metrics: dict[str, Any] | None,
    ) -> dict[str, dict[str, str]]:
        """Publish this attempt's model files under keys of their own.

        They become the job's artefacts only in :meth:`_finish`, under the ownership check:
        a worker that lost its lease meanwhile never replaces another attempt's model.
        """
        from ppml.training.export import architecture_metadata, export_onnx, save_model

        receipt = receipt_metadata(job, dataset, steps=result.steps_done, metrics=metrics)
        receipt["architecture"] = architecture_metadata(
            arch=spec.model.arch,
            num_features=dataset.num_features,
            num_classes=dataset.num_classes,
            hidden_sizes=tuple(spec.model.hidden_sizes),
            channels=tuple(spec.model.channels),
            kernel_size=spec.model.kernel_size,
        )
        receipt["classes"] = json.dumps(dataset.classes.get("labels", []))
        stem = f"models/{job.id}.attempt-{job.attempts}"
        key = f"{stem}.safetensors"
        with self.store.staging(".safetensors") as staged:
            digest = save_model(staged, result.state_dict, metadata=receipt)
            self.store.publish(staged, key)
        artifacts = {"safetensors": {"key": key, "sha256": digest}}
        onnx_key = f"{stem}.onnx"
        try:
            with self.store.staging(".onnx") as staged:
                onnx_digest = export_onnx(staged, result.state_dict, metadata=receipt)
                self.store.publish(staged, onnx_key)
        except Exception:
            # The budget is spent and the weights are safe: a failed export must not lose the
            # job. The API answers 409 for the missing format.
            log.exception("job %s: ONNX export failed; serving safetensors only", job.id)
        else:
            artifacts["onnx"] = {"key": onnx_key, "sha256": onnx_digest}
        return artifacts

    def _finish(
        self,
        job: Job,
        status: JobStatus,
        *,
        steps: int,
        schedule: Schedule,
        error: dict[str, Any] | None = None,
        result: Outcome | None = None,
        released: ReleasedMetrics | None = None,
        artifacts: dict[str, dict[str, str]] | None = None,
    ) -> str:
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            ledger = Ledger(repos)
            budget = ledger.lock(job.dataset_id)
            row = repos.job_by_id(job.id, lock=True)
            if row is None or JobStatus(row.status).terminal or row.lease_owner != self.owner:
                self._discard(artifacts)
                return "skipped"
            commit = None
            if budget is not None:
                commit, _ = ledger.settle(budget, job.id, steps=steps, note=status.value)
            row.status = status
            row.error = error
            row.steps_done = steps
            row.finished_at = utcnow()
            row.updated_at = row.finished_at
            row.lease_expires_at = None
            if result is not None:
                row.progress = _progress(
                    result.steps_done, schedule, JobSpec.model_validate(row.spec)
                )
            if released is not None:
                row.metrics, row.metrics_history = released.metrics, released.history
                row.exact_metrics = released.exact
            if row.privacy is not None:
                row.privacy = acc.final_privacy(row.privacy, steps, commit.id if commit else None)
            if artifacts is not None:
                row.artifacts = artifacts
        JobCheckpoints(self.store, job.id).clear()  # a finished job never resumes
        log.info("job %s %s after %d steps", job.id, status.value, steps)
        return status.value

    def _discard(self, artifacts: dict[str, dict[str, str]] | None) -> None:
        """Delete this attempt's files: the job is another attempt's, or finished already."""
        for artifact in (artifacts or {}).values():
            self.store.delete(artifact["key"])


def _progress(steps: int, schedule: Schedule, spec: JobSpec) -> dict[str, Any]:
    fraction = round(min(1.0, steps / schedule.total_steps), 6)
    if spec.federated is None:
        return {
            "fraction": fraction,
            "epoch": steps // schedule.steps_per_epoch,
            "round": None,
            "steps": steps,
        }
    rounds = steps // schedule.steps_per_epoch
    epochs = rounds * spec.federated.local_epochs
    return {"fraction": fraction, "epoch": epochs, "round": rounds, "steps": steps}
