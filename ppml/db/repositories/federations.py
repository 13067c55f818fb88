"""Federations, their nodes and the tasks rounds give them (#16)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, update

from ppml.db.federations import (
    Federation,
    FederationNode,
    FederationTask,
    NodeStatus,
    TaskStatus,
)
from ppml.db.models import Dataset
from ppml.db.repositories.base import Page, Queries


class FederationQueries(Queries):
    """Federations (tenant-scoped), nodes (by credential for the node API), tasks."""

    # --- federations ------------------------------------------------------------------
    def federation(self, tenant_id: str, federation_id: str) -> Federation | None:
        return self.session.scalar(
            select(Federation).where(
                Federation.id == federation_id, Federation.tenant_id == tenant_id
            )
        )

    def federation_by_id(self, federation_id: str) -> Federation | None:
        """Unscoped: for the node API and workers (they act for the federation's owner)."""
        return self.session.get(Federation, federation_id)

    def list_federations(self, tenant_id: str, *, page_size: int, page_token: str | None) -> Page:
        stmt = select(Federation).where(Federation.tenant_id == tenant_id)
        return self._page(stmt, Federation.id, page_size, page_token)

    # --- nodes ------------------------------------------------------------------------
    def federation_nodes(self, federation_ids: Sequence[str]) -> Sequence[FederationNode]:
        """The nodes of these federations, oldest first."""
        stmt = select(FederationNode).where(FederationNode.federation_id.in_(federation_ids))
        return self.session.scalars(stmt.order_by(FederationNode.id)).all()

    def active_nodes(self, federation_id: str) -> Sequence[FederationNode]:
        stmt = select(FederationNode).where(
            FederationNode.federation_id == federation_id,
            FederationNode.status == NodeStatus.ACTIVE,
        )
        return self.session.scalars(stmt.order_by(FederationNode.id)).all()

    def federation_node(self, federation_id: str, node_id: str) -> FederationNode | None:
        return self.session.scalar(
            select(FederationNode).where(
                FederationNode.id == node_id, FederationNode.federation_id == federation_id
            )
        )

    def node_by_id(self, node_id: str, *, lock: bool = False) -> FederationNode | None:
        stmt = select(FederationNode).where(FederationNode.id == node_id)
        if lock:
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        return self.session.scalar(stmt)

    def node_by_enrolment_hash(
        self, token_hash: str, *, lock: bool = False
    ) -> FederationNode | None:
        stmt = select(FederationNode).where(FederationNode.enrolment_token_hash == token_hash)
        if lock:
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        return self.session.scalar(stmt)

    def node_by_credential_hash(self, credential_hash: str) -> FederationNode | None:
        return self.session.scalar(
            select(FederationNode).where(FederationNode.credential_hash == credential_hash)
        )

    def touch_node(self, node_id: str, *, now: datetime) -> None:
        self.session.execute(
            update(FederationNode)
            .where(FederationNode.id == node_id)
            .values(last_seen=now)
            .execution_options(synchronize_session=False)
        )

    def refresh_backing_counts(self, federation: Federation) -> None:
        """The backing dataset's num_clients (active nodes) and num_train (their rows)."""
        count, rows = self.session.execute(
            select(func.count(), func.coalesce(func.sum(FederationNode.rows), 0)).where(
                FederationNode.federation_id == federation.id,
                FederationNode.status == NodeStatus.ACTIVE,
            )
        ).one()
        self.session.execute(
            update(Dataset)
            .where(Dataset.id == federation.dataset_id)
            .values(num_clients=int(count), num_train=int(rows or 0))
            .execution_options(synchronize_session=False)
        )

    # --- tasks ------------------------------------------------------------------------
    def task(self, task_id: str) -> FederationTask | None:
        return self.session.get(FederationTask, task_id)

    def node_task(self, node_id: str, task_id: str) -> FederationTask | None:
        return self.session.scalar(
            select(FederationTask).where(
                FederationTask.id == task_id, FederationTask.node_id == node_id
            )
        )

    def oldest_open_task(self, node_id: str, *, now: datetime) -> FederationTask | None:
        """The node's oldest open task whose deadline has not passed."""
        stmt = select(FederationTask).where(
            FederationTask.node_id == node_id,
            FederationTask.status == TaskStatus.OPEN,
            FederationTask.deadline > now,
        )
        return self.session.scalars(stmt.order_by(FederationTask.id).limit(1)).first()

    def round_tasks(self, job_id: str, round_: int) -> Sequence[FederationTask]:
        stmt = select(FederationTask).where(
            FederationTask.job_id == job_id, FederationTask.round == round_
        )
        return self.session.scalars(stmt.order_by(FederationTask.id)).all()

    def finish_task(
        self, task_id: str, status: TaskStatus, *, now: datetime, **values: object
    ) -> bool:
        """Move an open task to ``status`` (with ``values``); False if it was not open."""
        result = self.session.execute(
            update(FederationTask)
            .where(FederationTask.id == task_id, FederationTask.status == TaskStatus.OPEN)
            .values(status=status, finished_at=now, **values)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0) == 1)

    def mark_task_started(self, task_id: str, *, now: datetime) -> None:
        """Record the first fetch of an open task's weights (later fetches keep it)."""
        self.session.execute(
            update(FederationTask)
            .where(FederationTask.id == task_id, FederationTask.started_at.is_(None))
            .values(started_at=now)
            .execution_options(synchronize_session=False)
        )

    def reject_accepted(self, task_id: str, *, now: datetime, detail: str) -> None:
        """An accepted update that failed the server loop's own checks."""
        self.session.execute(
            update(FederationTask)
            .where(FederationTask.id == task_id, FederationTask.status == TaskStatus.ACCEPTED)
            .values(status=TaskStatus.REJECTED, finished_at=now, detail=detail)
            .execution_options(synchronize_session=False)
        )

    def close_open_tasks(
        self,
        status: TaskStatus,
        *,
        now: datetime,
        job_id: str | None = None,
        round_: int | None = None,
        node_id: str | None = None,
        detail: str | None = None,
    ) -> int:
        """Move the open tasks of a job (a round of it) or of a node to ``status``."""
        stmt = update(FederationTask).where(FederationTask.status == TaskStatus.OPEN)
        if job_id is not None:
            stmt = stmt.where(FederationTask.job_id == job_id)
        if round_ is not None:
            stmt = stmt.where(FederationTask.round == round_)
        if node_id is not None:
            stmt = stmt.where(FederationTask.node_id == node_id)
        result = self.session.execute(
            stmt.values(status=status, finished_at=now, detail=detail).execution_options(
                synchronize_session=False
            )
        )
        return int(getattr(result, "rowcount", 0))
