"""Every change of a job's status, through one transition table.

::

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
      │                 │
      │                 ├──requeue (worker lost, attempts left)──▶ queued
      │                 └──preempt (yields to another tenant)────▶ queued
      └──cancel while queued──▶ cancelled

Workers are shared fairly between tenants: a free worker claims the job :func:`claim_next`
picks, whichever job its message named, and a job that has held its worker for a time slice
while another tenant's job waits yields at its next report (:func:`preempt`), from its
checkpoint, without a new charge.

A job's end is written in one place, :func:`finish`: it settles the ledger (commit what may
have run, release the rest), sets the terminal status, records the privacy outcome, and keeps
or discards the attempt's model files. The runner, the reaper and cancellation all end jobs
through it, inside their own unit of work, under the budget row's lock taken first (lock
order: budget row, then job row).

Every status change and every change of progress here also records the job's next event
(``ppml.db.models.JobEvent``) in the same transaction: the event stream replays them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ppml.db.models import Job, JobEventKind, JobStatus, LedgerEntry, utcnow
from ppml.db.repositories import Repositories
from ppml.jobs import webhooks
from ppml.jobs.receipts import sign_release
from ppml.jobs.records import Artifacts, JobError, Progress, Receipt
from ppml.privacy.evaluation import ReleasedMetrics
from ppml.privacy.ledger import Ledger
from ppml.specs import JobSpec
from ppml.trust.keys import SigningKeys

__all__ = [
    "TRANSITIONS",
    "Ending",
    "IllegalTransition",
    "claim",
    "claim_next",
    "finish",
    "move",
    "new_job",
    "new_job_columns",
    "preempt",
    "requeue",
]

QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING
SUCCEEDED, FAILED, CANCELLED = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED

#: The statuses a job may move to from each status. Terminal statuses lead nowhere.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    QUEUED: frozenset({RUNNING, CANCELLED}),
    RUNNING: frozenset({QUEUED, SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A status change the table does not allow: a bug, never a user's error."""


def move(repos: Repositories, job: Job, to: JobStatus, *, now: datetime | None = None) -> None:
    """Set ``job.status`` to ``to`` if the table allows it (the only status assignment), and
    record the ``status`` event. ``job`` is locked in the caller's transaction."""
    current = JobStatus(job.status)
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(f"job {job.id}: {current} → {to} is not a transition")
    repos.append_job_event(job.id, JobEventKind.STATUS, {"status": to.value})
    job.status = to
    job.updated_at = now or utcnow()
    if to.terminal:
        job.finished_at = job.updated_at
        job.lease_owner = job.lease_expires_at = None


def new_job(*, spec: JobSpec, progress: Progress, **fields: object) -> Job:
    """A job row in its first status, ``queued``."""
    return Job(**new_job_columns(spec=spec, progress=progress, **fields))


def new_job_columns(*, spec: JobSpec, progress: Progress, **fields: object) -> dict[str, Any]:
    """The columns of :func:`new_job`'s row, defaults included: what a bulk insert of new
    jobs writes (the row a flush of the :class:`Job` would write)."""
    now = utcnow()
    # The columns with server defaults get their values here, as their Python defaults would:
    # a row that leaves one to the server makes the ORM insert a batch of jobs with RETURNING,
    # as one long multi-row statement that is rendered, and parsed by psycopg, anew each time.
    defaults = {
        "preemptions": 0,
        "last_event_seq": 0,
        "attempts": 0,
        "cancel_requested": False,
        "data_touched": False,
        "steps_done": 0,
        "queued_at": now,
        "created_at": now,
        "updated_at": now,
    }
    return {**defaults, **fields, "status": QUEUED, "spec": spec, "progress": progress}


def claim(repos: Repositories, job_id: str, *, owner: str, lease_until: datetime) -> bool:
    """queued → running for one worker: a conditional update, so only one claim wins; the
    winner records the ``status`` event on the row it now holds."""
    assert RUNNING in TRANSITIONS[QUEUED]
    if not repos.claim_job(job_id, owner=owner, lease_until=lease_until, status=RUNNING):
        return False
    repos.append_job_event(job_id, JobEventKind.STATUS, {"status": RUNNING.value})
    return True


def claim_next(repos: Repositories, hint: str, *, owner: str, lease_until: datetime) -> str | None:
    """queued → running for the job a free worker should run next, fairly between tenants
    (``Repositories.next_queued_job``); its tenant is marked served. None when no job waits.

    A message names a job (``hint``), which runs when fairness allows; otherwise the message
    is a turn for the job that should go first. Each queued job was sent one message, so the
    job a turn skipped is run by a later turn, and a duplicate turn finds nothing."""
    job_id = repos.next_queued_job(hint)
    if job_id is None or not claim(repos, job_id, owner=owner, lease_until=lease_until):
        return None
    job = repos.job_by_id(job_id)
    assert job is not None
    repos.mark_tenant_claimed(job.tenant_id, now=utcnow())
    return job_id


def requeue(repos: Repositories, job: Job) -> None:
    """running → queued after its worker was lost; the reservation stays."""
    move(repos, job, QUEUED)
    job.lease_owner = job.lease_expires_at = None
    job.enqueued_at = None
    job.queued_at = job.updated_at


def preempt(repos: Repositories, job: Job) -> None:
    """running → queued: the job yielded its worker to another tenant's at a report, where
    its checkpoint was written. The reservation stays, nothing is charged, and the claim does
    not count toward max_attempts. It waits at the back of its tenant's line; the caller
    sends its message after the commit (unsent, the reaper sends it)."""
    move(repos, job, QUEUED)
    job.lease_owner = job.lease_expires_at = None
    job.enqueued_at = None
    job.queued_at = job.updated_at
    job.preemptions += 1


@dataclass(frozen=True, kw_only=True)
class Ending:
    """How a job ends.

    Attributes:
        status: The terminal status.
        steps: Steps to charge: None when the data was never touched (a full release).
        note: Why, on the ledger's release entry.
        error: Why it failed.
        progress: The final progress (the runner's report of where it stopped).
        released: Its metrics (the runner only).
        artifacts: This attempt's model files: the job's if the job ends here, deleted if not.
        receipt: The receipt those files carry.
    """

    status: JobStatus
    steps: int | None
    note: str
    error: JobError | None = None
    progress: Progress | None = None
    released: ReleasedMetrics | None = None
    artifacts: Artifacts | None = None
    receipt: Receipt | None = None


def finish(
    repos: Repositories, job: Job, ending: Ending, *, keys: SigningKeys | None = None
) -> LedgerEntry | None:
    """End ``job`` (locked, not terminal): settle its charge and record its outcome.

    The caller holds the budget row's lock (taken before the job row's) and commits. A job
    that succeeds with model files gets its receipt signed with ``keys`` here, in the same
    transaction: the receipt binds the COMMIT entry and the ledger's chain head, which exist
    only now. Returns the ledger's COMMIT entry, if anything was committed.
    """
    ledger = Ledger(repos)
    budget = repos.budget(job.dataset_id)  # locked by the caller in this transaction
    commit = None
    if budget is not None:
        commit, _release = ledger.settle(budget, job.id, steps=ending.steps, note=ending.note)
    progress = job.progress
    job.error = ending.error
    if ending.steps is not None:
        job.steps_done = ending.steps
    if ending.progress is not None:
        job.progress = ending.progress
    if ending.released is not None:
        job.metrics, job.metrics_history = ending.released.metrics, ending.released.history
        job.exact_metrics = ending.released.exact
    if job.privacy is not None:
        job.privacy = job.privacy.finished(ending.steps, commit.id if commit else None)
        job.progress = job.progress.model_copy(update={"epsilon_spent": job.privacy.epsilon_spent})
    # The final report (and ε of the whole run) comes before the terminal status: a follower
    # has the last figures when it learns that the job ended.
    if job.progress != progress:
        data = job.progress.model_dump(mode="json")
        repos.append_job_event(job.id, JobEventKind.PROGRESS, data)
    move(repos, job, ending.status)
    if ending.artifacts is not None:
        job.artifacts, job.receipt = ending.artifacts, ending.receipt
        if keys is not None and ending.status == SUCCEEDED and job.receipt is not None:
            sign_release(repos, job, keys)
    webhooks.stage(repos, job)  # its outbox row commits with the end, or neither does
    return commit
