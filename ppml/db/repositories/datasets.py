"""Datasets and their budgets."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, func, select, update

from ppml.db.models import (
    Dataset,
    DatasetBudget,
    DatasetStatus,
    Job,
    Tenant,
    utcnow,
)
from ppml.db.repositories.base import Page, Queries

# Built once (admission runs it under the tenant's lock; see lock_budget_of_live).
_LOCK_BUDGET_OF_LIVE = (
    select(DatasetBudget, Dataset.deleted_at)
    .join(Dataset, Dataset.id == DatasetBudget.dataset_id)
    .where(DatasetBudget.dataset_id == bindparam("dataset_id"))
    .with_for_update(of=DatasetBudget)
    .execution_options(populate_existing=True)
)


class DatasetQueries(Queries):
    """Datasets, uploads being ingested, budgets."""

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
        """The tenant's datasets, deleted ones and federations' backing rows left out."""
        stmt = select(Dataset).where(
            Dataset.tenant_id == tenant_id,
            Dataset.deleted_at.is_(None),
            Dataset.federation_backing.is_(False),
        )
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

    def lock_budget_of_live(self, dataset_id: str) -> tuple[DatasetBudget | None, bool | None]:
        """The budget row locked as ``budget(lock=True)`` locks it, and whether its dataset
        was deleted, in one statement; ``(None, None)`` when the dataset has no budget.

        For admission, which asks both under the tenant's row lock: a deletion takes that
        lock too, so ``deleted_at`` cannot change between this statement and the commit.
        """
        row = self.session.execute(_LOCK_BUDGET_OF_LIVE, {"dataset_id": dataset_id}).first()
        if row is None:
            return None, None
        return row[0], row[1] is not None

    def budget_version(self, dataset_id: str) -> int | None:
        """The budget row's version alone (it changes with every ledger write), or None."""
        stmt = select(DatasetBudget.version).where(DatasetBudget.dataset_id == dataset_id)
        return self.session.scalar(stmt)

    def all_budgets(self) -> Sequence[DatasetBudget]:
        return self.session.scalars(select(DatasetBudget)).all()
