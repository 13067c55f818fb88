"""Repositories: every SQL statement of ppml lives here.

Each takes an open :class:`~sqlalchemy.orm.Session`; the caller owns the transaction.
Every tenant-owned lookup takes the tenant id, so ownership cannot be forgotten.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, insert, select, text, update
from sqlalchemy.orm import Session, aliased

from ppml.db.models import (
    ApiKey,
    AuditEvent,
    Dataset,
    DatasetBudget,
    DatasetStatus,
    Job,
    JobEvent,
    JobEventKind,
    JobStatus,
    LedgerAcknowledgement,
    LedgerEntry,
    Tenant,
    utcnow,
)
from ppml.jobs.records import Progress

__all__ = ["Page", "Repositories"]

Page = tuple[list[Any], str | None]

TERMINAL = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]


class Repositories:
    """Typed queries over one session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # --- health -----------------------------------------------------------------------
    def ping(self) -> None:
        """A round trip to the database (readiness)."""
        self.session.execute(text("SELECT 1"))

    def jobs_by_status(self) -> dict[str, int]:
        """How many jobs each status holds (operators' metrics)."""
        rows = self.session.execute(select(Job.status, func.count()).group_by(Job.status))
        return {str(status): int(count) for status, count in rows.all()}

    # --- tenants and keys -------------------------------------------------------------
    def add(self, *objects: Any) -> None:
        self.session.add_all(objects)
        self.session.flush()

    def stage(self, *objects: Any) -> None:
        """Add without flushing: the next query or the commit writes them, in one flush."""
        self.session.add_all(objects)

    def tenant_by_name(self, name: str) -> Tenant | None:
        return self.session.scalar(select(Tenant).where(Tenant.name == name))

    def tenant(self, tenant_id: str) -> Tenant | None:
        return self.session.get(Tenant, tenant_id)

    def list_tenants(self, *, page_size: int, page_token: str | None) -> Page:
        stmt = select(Tenant)
        return self._page(stmt, Tenant.id, page_size, page_token, descending=False)

    def lock_tenant(self, tenant_id: str) -> bool:
        """Lock the tenant's row (``FOR NO KEY UPDATE``): admissions of one tenant take turns.

        ``NO KEY`` leaves rows that refer to the tenant (new datasets, keys, jobs) free to be
        inserted meanwhile. A no-op on SQLite, whose writers hold the database lock. Returns
        whether the tenant exists.
        """
        stmt = select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True)
        return self.session.scalar(stmt) is not None

    def api_key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or expired ones included."""
        return self.session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))

    def api_key(self, tenant_id: str, key_id: str) -> ApiKey | None:
        return self.session.scalar(
            select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id)
        )

    def list_api_keys(self, tenant_id: str, *, page_size: int, page_token: str | None) -> Page:
        stmt = select(ApiKey).where(ApiKey.tenant_id == tenant_id)
        return self._page(stmt, ApiKey.id, page_size, page_token)

    def touch_api_key(self, key_id: str, *, now: datetime, not_since: datetime) -> None:
        """Set the key's ``last_used_at`` to ``now`` unless it was set at ``not_since`` or later
        (so concurrent requests and API processes write it at most once per interval)."""
        self.session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id)
            .where((ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < not_since))
            .values(last_used_at=now)
        )

    # --- datasets ---------------------------------------------------------------------
    def dataset(self, tenant_id: str, dataset_id: str) -> Dataset | None:
        return self.session.scalar(
            select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
        )

    def dataset_by_id(self, dataset_id: str) -> Dataset | None:
        """Unscoped lookup, for workers only (they act for the job's owner)."""
        return self.session.get(Dataset, dataset_id)

    def lock_dataset(self, dataset_id: str) -> Dataset | None:
        """The dataset row ``FOR UPDATE`` (workers: ingestion), read afresh."""
        stmt = select(Dataset).where(Dataset.id == dataset_id).with_for_update()
        return self.session.scalar(stmt.execution_options(populate_existing=True))

    def tenant_stored_bytes(self, tenant_id: str) -> int:
        """Bytes the tenant's datasets keep in the store, under the tenant row's lock, so
        concurrent uploads of one tenant are checked against its quota one at a time."""
        self.session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
        total = self.session.scalar(
            select(func.coalesce(func.sum(Dataset.stored_bytes), 0)).where(
                Dataset.tenant_id == tenant_id
            )
        )
        return int(total or 0)

    def unsent_ingestions(self, *, sent_before: datetime, started_before: datetime) -> list[str]:
        """Validating datasets whose ingestion task was last sent before ``sent_before`` and
        whose last attempt (if any) began before ``started_before``."""
        stmt = select(Dataset.id).where(
            Dataset.status == DatasetStatus.VALIDATING,
            (Dataset.ingest_sent_at.is_(None)) | (Dataset.ingest_sent_at < sent_before),
            (Dataset.ingest_started_at.is_(None)) | (Dataset.ingest_started_at < started_before),
        )
        return list(self.session.scalars(stmt.order_by(Dataset.id).limit(500)).all())

    def mark_ingest_sent(self, dataset_id: str) -> None:
        self.session.execute(
            update(Dataset)
            .where(Dataset.id == dataset_id)
            .values(ingest_sent_at=utcnow())
            .execution_options(synchronize_session=False)
        )

    def split_secrets_to_seal(
        self, active_key_id: str, *, after: str, limit: int
    ) -> list[tuple[str, str]]:
        """``(id, stored split secret)`` of datasets after ``after`` whose secret is plain
        (written before sealing) or sealed under another key than the active one."""
        stmt = select(Dataset.id, Dataset.split_secret).where(
            Dataset.id > after,
            Dataset.split_secret.is_not(None),
            Dataset.split_secret.not_like(f"v1:{active_key_id}:%"),
        )
        rows = self.session.execute(stmt.order_by(Dataset.id).limit(limit)).all()
        return [(row.id, row.split_secret) for row in rows]

    def replace_split_secret(self, dataset_id: str, *, stored: str, sealed: str) -> bool:
        """Store ``sealed`` if the row still holds ``stored`` (a concurrent run may have)."""
        result = self.session.execute(
            update(Dataset)
            .where(Dataset.id == dataset_id, Dataset.split_secret == stored)
            .values(split_secret=sealed)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0) == 1)

    def list_datasets(self, tenant_id: str, *, page_size: int, page_token: str | None) -> Page:
        """The tenant's datasets, deleted ones left out."""
        stmt = select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.deleted_at.is_(None))
        return self._page(stmt, Dataset.id, page_size, page_token)

    def budgeted_dataset_with_fingerprint(
        self, tenant_id: str, fingerprint: str, *, excluding: str | None = None
    ) -> Dataset | None:
        """The tenant's oldest dataset with a budget whose rows have this fingerprint, deleted
        ones included (only ready rows get a fingerprint)."""
        stmt = select(Dataset).where(
            Dataset.tenant_id == tenant_id,
            Dataset.fingerprint == fingerprint,
            Dataset.epsilon_total.is_not(None),
        )
        if excluding is not None:
            stmt = stmt.where(Dataset.id != excluding)
        return self.session.scalars(stmt.order_by(Dataset.id).limit(1)).first()

    def dataset_deleted(self, dataset_id: str) -> bool:
        """Whether the dataset was deleted (admission asks under the tenant's lock)."""
        stmt = select(Dataset.deleted_at).where(Dataset.id == dataset_id)
        return self.session.scalar(stmt) is not None

    def dataset_jobs(self, dataset_id: str) -> Sequence[Job]:
        """Every job of the dataset, whatever its status."""
        stmt = select(Job).where(Job.dataset_id == dataset_id)
        return self.session.scalars(stmt.order_by(Job.id)).all()

    def datasets_validated_by(self, dataset_id: str, *, limit: int = 10) -> list[str]:
        """Datasets not deleted that name this one as their validation set."""
        stmt = select(Dataset.id).where(
            Dataset.validation_dataset_id == dataset_id, Dataset.deleted_at.is_(None)
        )
        return list(self.session.scalars(stmt.order_by(Dataset.id).limit(limit)).all())

    def budget(self, dataset_id: str, *, lock: bool = False) -> DatasetBudget | None:
        """The budget row; ``lock`` takes ``FOR UPDATE`` (a no-op on SQLite, whose writer
        sessions already hold the database lock from ``BEGIN IMMEDIATE``)."""
        stmt = select(DatasetBudget).where(DatasetBudget.dataset_id == dataset_id)
        if lock:
            stmt = stmt.with_for_update()
            # Within a transaction that read the row before, make sure we see the newest.
            stmt = stmt.execution_options(populate_existing=True)
        return self.session.scalar(stmt)

    def budget_version(self, dataset_id: str) -> int | None:
        """The budget row's version alone (it changes with every ledger write), or None."""
        stmt = select(DatasetBudget.version).where(DatasetBudget.dataset_id == dataset_id)
        return self.session.scalar(stmt)

    def all_budgets(self) -> Sequence[DatasetBudget]:
        return self.session.scalars(select(DatasetBudget)).all()

    # --- jobs -------------------------------------------------------------------------
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

    def active_compute(self, tenant_id: str) -> int:
        """Summed compute estimate of a tenant's queued and running jobs (a job admitted
        before estimates existed counts 0)."""
        active = (JobStatus.QUEUED, JobStatus.RUNNING)
        stmt = select(func.coalesce(func.sum(func.coalesce(Job.compute, 0)), 0)).where(
            Job.tenant_id == tenant_id, Job.status.in_(active)
        )
        return int(self.session.scalar(stmt) or 0)

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
        claims hold are skipped."""
        hinted = select(Job.tenant_id).where(Job.id == hint).scalar_subquery()
        other = aliased(Job)
        running = (
            select(func.count())
            .select_from(other)
            .where(other.tenant_id == Job.tenant_id, other.status == JobStatus.RUNNING)
            .scalar_subquery()
        )
        stmt = (
            select(Job.id)
            .join(Tenant, Tenant.id == Job.tenant_id)
            .where(Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False))
            .order_by(
                running,
                Tenant.last_claim_at.asc().nulls_first(),
                case((Job.tenant_id == hinted, 0), else_=1),
                Job.tenant_id,
                case((Job.id == hint, 0), else_=1),
                Job.queued_at,
                Job.id,
            )
            .limit(1)
            .with_for_update(of=Job, skip_locked=True)
        )
        return self.session.scalar(stmt)

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
    ) -> tuple[bool, bool]:
        """Record progress under the lease, and a ``progress`` event when it changed.

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

    # --- ledger -----------------------------------------------------------------------
    def ledger_entry(self, idempotency_key: str) -> LedgerEntry | None:
        return self.session.scalar(
            select(LedgerEntry).where(LedgerEntry.idempotency_key == idempotency_key)
        )

    def ledger_entries(self, dataset_id: str) -> Sequence[LedgerEntry]:
        stmt = select(LedgerEntry).where(LedgerEntry.dataset_id == dataset_id)
        return self.session.scalars(stmt.order_by(LedgerEntry.id)).all()

    def job_ledger_entries(self, job_id: str) -> Sequence[LedgerEntry]:
        stmt = select(LedgerEntry).where(LedgerEntry.job_id == job_id)
        return self.session.scalars(stmt.order_by(LedgerEntry.id)).all()

    def newest_ledger_entry(self, dataset_id: str) -> LedgerEntry | None:
        """The dataset's newest ledger entry, the head of its chain (signed receipts bind
        it). Read under the budget row's lock, so no entry is appended meanwhile."""
        stmt = select(LedgerEntry).where(LedgerEntry.dataset_id == dataset_id)
        return self.session.scalars(stmt.order_by(LedgerEntry.seq.desc()).limit(1)).first()

    def list_ledger(self, dataset_id: str, *, page_size: int, page_token: str | None) -> Page:
        stmt = select(LedgerEntry).where(LedgerEntry.dataset_id == dataset_id)
        return self._page(stmt, LedgerEntry.id, page_size, page_token, descending=False)

    # --- the ledger's hash chains (ppml.privacy.chain) ---------------------------------
    def ledger_head(self, dataset_id: str) -> tuple[int, str] | None:
        """``(seq, entry_hash)`` of the dataset's last chained entry (None: no entries): one
        probe of the ``(dataset_id, seq)`` index."""
        stmt = (
            select(LedgerEntry.seq, LedgerEntry.entry_hash)
            .where(LedgerEntry.dataset_id == dataset_id)
            .order_by(LedgerEntry.seq.desc())
            .limit(1)
        )
        row = self.session.execute(stmt).first()
        return None if row is None else (int(row[0]), str(row[1]))

    def ledger_hash_at(self, dataset_id: str, seq: int) -> str | None:
        """The ``entry_hash`` of the dataset's entry ``seq``, or None."""
        stmt = select(LedgerEntry.entry_hash).where(
            LedgerEntry.dataset_id == dataset_id, LedgerEntry.seq == seq
        )
        return self.session.scalar(stmt)

    def ledger_chain(self, dataset_id: str) -> Sequence[LedgerEntry]:
        """The dataset's entries in chain order."""
        stmt = select(LedgerEntry).where(LedgerEntry.dataset_id == dataset_id)
        return self.session.scalars(stmt.order_by(LedgerEntry.seq)).all()

    def ledger_dataset_ids(self) -> list[str]:
        """Every dataset with ledger entries, or a budget (an empty chain)."""
        with_entries = select(LedgerEntry.dataset_id).distinct()
        with_budget = select(DatasetBudget.dataset_id)
        ids = set(self.session.scalars(with_entries)) | set(self.session.scalars(with_budget))
        return sorted(ids)

    def ledger_acknowledgements(self, dataset_id: str) -> Sequence[LedgerAcknowledgement]:
        stmt = select(LedgerAcknowledgement).where(LedgerAcknowledgement.dataset_id == dataset_id)
        return self.session.scalars(stmt.order_by(LedgerAcknowledgement.id)).all()

    # --- audit trail (append-only: no statement here updates or deletes a row) ----------
    def list_audit(
        self,
        tenant_id: str,
        *,
        action: str | None,
        object_id: str | None,
        page_size: int,
        page_token: str | None,
    ) -> Page:
        """The tenant's audit events, oldest first (a client follows the trail by passing
        the last id it read)."""
        stmt = select(AuditEvent).where(AuditEvent.tenant_id == tenant_id)
        if action is not None:
            stmt = stmt.where(AuditEvent.action == action)
        if object_id is not None:
            stmt = stmt.where(AuditEvent.object_id == object_id)
        return self._page(stmt, AuditEvent.id, page_size, page_token, descending=False)

    # --- helpers ----------------------------------------------------------------------
    def _page(
        self,
        stmt: Any,
        key: Any,
        page_size: int,
        page_token: str | None,
        *,
        descending: bool = True,
    ) -> Page:
        """Keyset pagination on a creation-ordered id; the token is the last id served."""
        if page_token is not None:
            stmt = stmt.where(key < page_token if descending else key > page_token)
        stmt = stmt.order_by(key.desc() if descending else key.asc()).limit(page_size + 1)
        rows = list(self.session.scalars(stmt).all())
        if len(rows) > page_size:
            rows = rows[:page_size]
            return rows, str(getattr(rows[-1], "id"))  # noqa: B009
        return rows, None
