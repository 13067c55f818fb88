"""What the component tests of the job lifecycle share (runner, reaper, job service): fresh
reads of what a component wrote, and a world of one tenant whose jobs a runner runs."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update

from ppml.config import Limits, Settings, WorkerSettings
from ppml.db.models import Dataset, Job, JobStatus, LedgerEntry, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.jobs.checkpoints import JobCheckpoints
from ppml.jobs.schedule import Schedule, schedule
from ppml.queue import RUN_JOB, make_celery
from ppml.services.datasets import BudgetRequest, register_builtin
from ppml.services.jobs import JobService
from ppml.services.tenants import create_tenant
from ppml.specs import JobSpec
from ppml.storage import ArtifactStore


@dataclass
class Reads:
    """Fresh reads of what a component under test wrote."""

    db: Database

    def job(self, job_id: str) -> Job:
        with self.db.session() as session:
            job = Repositories(session).job_by_id(job_id)
        assert job is not None
        return job

    def job_ledger(self, job_id: str) -> list[LedgerEntry]:
        with self.db.session() as session:
            return list(Repositories(session).job_ledger_entries(job_id))


REPORT_EVERY = 5


@dataclass
class RunnerWorld(Reads):
    """One tenant, its datasets and the services a worker's runner works beside."""

    settings: Settings
    service: JobService
    store: ArtifactStore
    tenant_id: str

    def digits(self, *, epsilon: float | None) -> str:
        budget = None if epsilon is None else BudgetRequest(epsilon=epsilon, delta=1e-5)
        with self.db.session(write=True) as session:
            dataset = register_builtin(
                Repositories(session),
                self.store,
                self.settings,
                tenant_id=self.tenant_id,
                name="digits",
                builtin="digits",
                budget=budget,
            )
        return dataset.id

    def submit(
        self,
        *,
        private: bool,
        epochs: int = 1,
        gpus: int = 1,
        model: dict[str, Any] | None = None,
        learning_rate: float = 0.1,
    ) -> str:
        """A tiny logistic regression (or ``model``): on public digits, or DP on budgeted
        digits."""
        dataset_id = self.digits(epsilon=8.0 if private else None)
        privacy = {"target_epsilon": 2.0, "delta": 1e-5} if private else None
        spec = JobSpec.model_validate(
            {
                "name": "tiny",
                "dataset_id": dataset_id,
                "model": model or {"arch": "logreg"},
                "training": {
                    "epochs": epochs,
                    "batch_size": 64,
                    "learning_rate": learning_rate,
                },
                "privacy": privacy,
                "resources": {"gpus": gpus},
            }
        )
        job, created = self.service.submit(self.tenant_id, spec)
        assert created and job.status == JobStatus.QUEUED
        return job.id

    def plan(self, job_id: str) -> Schedule:
        job = self.job(job_id)
        with self.db.session() as session:
            dataset = Repositories(session).dataset_by_id(job.dataset_id)
        assert dataset is not None
        return schedule(job.spec, dataset)

    def model_files(self, job_id: str) -> list[str]:
        folder = self.store.root / "models"
        return sorted(p.name for p in folder.glob(f"{job_id}.*")) if folder.is_dir() else []

    def model_file_stamps(self, job_id: str) -> dict[str, tuple[int, int, int]]:
        """Each model file's inode, size and modification time: rewritten files differ."""
        stamps = {}
        for name in self.model_files(job_id):
            stat = (self.store.root / "models" / name).stat()
            stamps[name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        return stamps

    def checkpoints(self, job_id: str) -> list[int]:
        return JobCheckpoints(self.store, job_id).attempts()

    def expire_lease(self, job_id: str) -> None:
        """The worker vanished: its lease is moved into the past (not waited for)."""
        with self.db.session(write=True) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(lease_expires_at=utcnow() - timedelta(seconds=1))
                .execution_options(synchronize_session=False)
            )


def worker_settings(settings: Settings, **worker: Any) -> Settings:
    """The test's settings with a small reporting interval and a queue of its own."""
    fields = {
        "report_every_steps": REPORT_EVERY,
        "queue": f"training-{secrets.token_hex(4)}",
        **worker,
    }
    return settings.model_copy(update={"worker": WorkerSettings(**fields)})


def make_world(database: Database, settings: Settings) -> RunnerWorld:
    with database.session(write=True) as session:
        tenant = create_tenant(Repositories(session), name=f"t-{secrets.token_hex(4)}")
    # memory:// broker: a send succeeds and goes nowhere a worker listens
    service = JobService(database, settings, make_celery(settings))
    return RunnerWorld(database, settings, service, ArtifactStore.for_settings(settings), tenant.id)


@dataclass
class ServiceWorld(Reads):
    """A tenant, its datasets, and the service under test on a queue of its own."""

    settings: Settings
    service: JobService
    tenant_id: str

    def digits(self, *, epsilon: float | None = 8.0, tenant_id: str | None = None) -> Dataset:
        budget = None if epsilon is None else BudgetRequest(epsilon=epsilon, delta=1e-5)
        with self.db.session(write=True) as session:
            return register_builtin(
                Repositories(session),
                ArtifactStore.for_settings(self.settings),
                self.settings,
                tenant_id=tenant_id or self.tenant_id,
                name="digits",
                builtin="digits",
                budget=budget,
            )

    def budget(self, dataset_id: str) -> Any:
        with self.db.session() as session:
            budget = Repositories(session).budget(dataset_id)
        assert budget is not None
        return budget

    def ledger(self, dataset_id: str) -> list[LedgerEntry]:
        with self.db.session() as session:
            return list(Repositories(session).ledger_entries(dataset_id))

    def job_count(self) -> int:
        with self.db.session() as session:
            return int(session.scalar(select(func.count()).select_from(Job)) or 0)

    def sent(self) -> list[str]:
        """Job ids of the run_job messages waiting in this test's queue (drains it)."""
        ids = []
        with self.service.celery.connection_for_read() as conn:
            queue = conn.SimpleQueue(self.settings.worker.queue, no_ack=True)
            while True:
                try:
                    message = queue.get(block=False)
                except queue.Empty:
                    break
                assert message.headers["task"] == RUN_JOB
                ids.append(message.payload[0][0])
            queue.close()
        return ids


def job_spec(dataset_id: str, *, epsilon: float | None = 1.0, epochs: int = 2) -> JobSpec:
    privacy = None if epsilon is None else {"target_epsilon": epsilon, "delta": 1e-5}
    return JobSpec.model_validate(
        {
            "name": "tiny",
            "dataset_id": dataset_id,
            "model": {"arch": "logreg"},
            "training": {"epochs": epochs, "batch_size": 64, "learning_rate": 0.1},
            "privacy": privacy,
        }
    )


def make_service_world(database: Database, settings: Settings, **limits: Any) -> ServiceWorld:
    worker = WorkerSettings(queue=f"training-{secrets.token_hex(4)}")  # memory:// is global
    settings = settings.model_copy(update={"worker": worker, "limits": Limits(**limits)})
    with database.session(write=True) as session:
        tenant = create_tenant(Repositories(session), name=f"t-{secrets.token_hex(4)}")
    service = JobService(database, settings, make_celery(settings))
    return ServiceWorld(database, settings, service, tenant.id)
