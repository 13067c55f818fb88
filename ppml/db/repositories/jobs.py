"""Jobs: admission counts, claims (fair sharing), heartbeats, leases and events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, insert, select, update

from ppml.db.models import (
    Job,
    JobEvent,
    JobEventKind,
    JobStatus,
    Tenant,
    utcnow,
)
from ppml.db.repositories.base import Page, Queries
from ppml.jobs.records import Progress


class JobQueries(Queries):
    """Jobs and their events."""

    # --- jobs -------------------------------------------------------------------------
    def insert_jobs(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert new jobs given as their columns (``ppml.jobs.lifecycle.new_job_columns``)
        in one bulk statement, now: a batch of admissions flushes no ORM row per job."""
        if rows:
            self.insert_rows(Job, rows)

    def job(self, tenant_id: str, job_id: str) -> Job | None:
        return self.session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))

    def job_by_id(self, job_id: str, *, lock: bool = False) -> Job | None:
        """Unscoped lookup, for workers only."""
        stmt = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
        if lock:
            stmt = stmt.with_for_update()
        return self.session.scalar(stmt)

    def job_by_idempotency_key(self, tenant_id: str, key: str) -> Job | None:
        return self.session.scalar(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
        )

    def list_jobs(
        self,
        tenant_id: str,
        *,
        status: str | None,
        dataset_id: str | None,
        page_size: int,
        page_token: str | None,
    ) -> Page:
        stmt = select(Job).where(Job.tenant_id == tenant_id)
        if status is not None:
            stmt = stmt.where(Job.status == status)
        if dataset_id is not None:
            stmt = stmt.where(Job.dataset_id == dataset_id)
        return self._page(stmt, Job.id, page_size, page_token)

    def count_active_jobs(self, tenant_id: str, *, up_to: int | None = None) -> int:
        """Queued and running jobs of a tenant; with ``up_to``, counting stops there."""
        active = (JobStatus.QUEUED, JobStatus.RUNNING)
        rows = select(Job.id).where(Job.tenant_id == tenant_id, Job.status.in_(active))
        if up_to is not None:
            rows = rows.limit(up_to)
        stmt = select(func.count()).select_from(rows.subquery())
        return int(self.session.scalar(stmt) or 0)

    def active_load(self, tenant_id: str) -> tuple[int, int]:
        """A tenant's queued and running jobs and their summed compute, in one scan (what
        admission reads under the tenant's lock; a job admitted before estimates existed
        counts 0)."""
        active = (JobStatus.QUEUED, JobStatus.RUNNING)
        stmt = select(
            func.count(), func.coalesce(func.sum(func.coalesce(Job.compute, 0)), 0)
        ).where(Job.tenant_id == tenant_id, Job.status.in_(active))
        count, compute = self.session.execute(stmt).one()
        return int(count), int(compute)

    def claim_job(
        self, job_id: str, *, owner: str, lease_until: datetime, status: JobStatus
    ) -> bool:
        """Conditional update queued → ``status`` (running; the transition is
        ``ppml.jobs.lifecycle``'s); False when another worker got it first."""
        now = utcnow()
        result = self.session.execute(
            update(Job)
            .where(
                Job.id == job_id, Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False)
            )
            .values(
                status=status,
                lease_owner=owner,
                lease_expires_at=lease_until,
                attempts=Job.attempts + 1,
                data_touched=True,
                started_at=func.coalesce(Job.started_at, now),
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0) == 1)

    def next_queued_job(self, hint: str | None = None) -> str | None:
        """The queued job a free worker should run next, fairly between tenants: of the
        tenant with the fewest running jobs, then the one whose last claim is oldest (never
        claimed first), its job queued longest ago. Among equals, ``hint`` (the job a message
        named) and its tenant go first. On PostgreSQL the row is locked, and rows other
        claims hold are skipped.

        Tenant first, then job: the tenants with queued jobs are ordered (one probe of the
        ``(tenant_id, status, queued_at)`` index per tenant), then the first tenant's job is
        one more probe, so a claim costs the same with ten queued jobs or ten thousand."""
        queued = (Job.status == JobStatus.QUEUED) & Job.cancel_requested.is_(False)
        hinted_tenant = self.session.scalar(select(Job.tenant_id).where(Job.id == hint))
        waiting = select(Job.id).where(Job.tenant_id == Tenant.id, queued).exists()
        running = (
            select(func.count())
            .where(Job.tenant_id == Tenant.id, Job.status == JobStatus.RUNNING)
            .scalar_subquery()
        )
        tenants = self.session.scalars(
            select(Tenant.id)
            .where(waiting)
            .order_by(
                running,
                Tenant.last_claim_at.asc().nulls_first(),
                case((Tenant.id == hinted_tenant, 0), else_=1),
                Tenant.id,
            )
        )
        for tenant_id in tenants:
            if tenant_id == hinted_tenant and hint is not None:
                found = self.session.scalar(
                    select(Job.id).where(Job.id == hint, queued).with_for_update(skip_locked=True)
                )
                if found is not None:
                    return found
            found = self.session.scalar(
                select(Job.id)
                .where(Job.tenant_id == tenant_id, queued)
                .order_by(Job.queued_at, Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if found is not None:
                return found
        return None

    def mark_tenant_claimed(self, tenant_id: str, *, now: datetime) -> None:
        """Record that a worker claimed one of the tenant's jobs (see next_queued_job)."""
        self.session.execute(
            update(Tenant)
            .where(Tenant.id == tenant_id)
            .values(last_claim_at=now)
            .execution_options(synchronize_session=False)
        )

    def others_waiting(self, tenant_id: str, *, queued_before: datetime) -> bool:
        """Whether another tenant has a job queued since before ``queued_before``."""
        stmt = (
            select(Job.id)
            .where(
                Job.status == JobStatus.QUEUED,
                Job.cancel_requested.is_(False),
                Job.tenant_id != tenant_id,
                Job.queued_at < queued_before,
            )
            .limit(1)
        )
        return self.session.scalar(stmt) is not None

    def heartbeat(
        self,
        job_id: str,
        *,
        owner: str,
        lease_until: datetime,
        progress: Progress,
        steps: int,
        scores: dict[str, Any] | None = None,
    ) -> tuple[bool, bool]:
        """Record progress under the lease, and a ``progress`` event when it changed, then
        a ``scores`` event (exact held-out figures, owner keys only) when given.

        Returns ``(still_owner, cancel_requested)``.
        """
        owned = self.session.execute(
            select(Job.progress, Job.cancel_requested)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
            .with_for_update()
        ).one_or_none()
        if owned is None:
            return False, True
        changed = owned.progress != progress
        now = utcnow()
        seq = self.session.scalar(
            update(Job)
            .where(Job.id == job_id)
            .values(
                progress=progress.model_dump(mode="json"),
                steps_done=steps,
                lease_expires_at=lease_until,
                heartbeat_at=now,
                updated_at=now,
                last_event_seq=Job.last_event_seq + (1 if changed else 0),
            )
            .returning(Job.last_event_seq)
            .execution_options(synchronize_session=False)
        )
        if changed:
            assert seq is not None
            self._add_event(job_id, seq, JobEventKind.PROGRESS, progress.model_dump(mode="json"))
        if scores is not None:
            self.append_job_event(job_id, JobEventKind.SCORES, scores)
        return True, bool(owned.cancel_requested)

    def expired_leases(self, now: datetime, *, limit: int = 100) -> list[str]:
        """Running jobs whose worker stopped renewing its lease."""
        stmt = (
            select(Job.id)
            .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
            .order_by(Job.id)
            .limit(limit)
        )
        return list(self.session.scalars(stmt).all())

    def unsent_jobs(self, *, created_before: datetime, sent_before: datetime) -> list[str]:
        """Queued jobs never enqueued (after a grace period) or enqueued long ago."""
        stmt = select(Job.id).where(
            Job.status == JobStatus.QUEUED,
            Job.cancel_requested.is_(False),
            ((Job.enqueued_at.is_(None)) & (Job.created_at < created_before))
            | (Job.enqueued_at < sent_before),
        )
        return list(self.session.scalars(stmt.order_by(Job.id).limit(500)).all())

    def mark_enqueued(self, job_id: str, *, sent: bool = True) -> None:
        """Record when the job's message was sent (``sent=False``: it could not be)."""
        self.session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(enqueued_at=utcnow() if sent else None)
            .execution_options(synchronize_session=False)
        )

    # --- job events -------------------------------------------------------------------
    def append_job_event(self, job_id: str, kind: JobEventKind, data: dict[str, Any]) -> int:
        """Record the job's next event; returns its seq.

        The caller changes the job row in this transaction (and holds its lock): the seq is
        the row's counter, incremented in one statement, so concurrent writers of one job
        queue on the row and never share a seq.
        """
        seq = self.session.scalar(
            update(Job)
            .where(Job.id == job_id)
            .values(last_event_seq=Job.last_event_seq + 1)
            .returning(Job.last_event_seq)
            .execution_options(synchronize_session=False)
        )
        if seq is None:
            raise LookupError(f"job {job_id} not found")
        self._add_event(job_id, seq, kind, data)
        return int(seq)

    def event_head(self, tenant_id: str, job_id: str) -> tuple[str, int] | None:
        """``(status, last_event_seq)`` of the tenant's job: what an event stream polls."""
        stmt = select(Job.status, Job.last_event_seq).where(
            Job.id == job_id, Job.tenant_id == tenant_id
        )
        row = self.session.execute(stmt).one_or_none()
        return None if row is None else (str(row.status), int(row.last_event_seq))

    def job_events(self, job_id: str, *, after: int, limit: int = 500) -> Sequence[JobEvent]:
        """The job's events after seq ``after``, oldest first."""
        stmt = (
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after)
            .order_by(JobEvent.seq)
            .limit(limit)
        )
        return self.session.scalars(stmt).all()

    def _add_event(self, job_id: str, seq: int, kind: JobEventKind, data: dict[str, Any]) -> None:
        # A Core insert, written now: the ORM's unit of work would order it by its own rules.
        self.session.execute(
            insert(JobEvent).values(
                job_id=job_id, seq=seq, kind=kind.value, data=data, created_at=utcnow()
            )
        )
