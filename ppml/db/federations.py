"""Models of federations (#16): remote data-owner nodes that train on their own rows.

A federation owns a *backing dataset* row (``datasets.federation_backing``): jobs, ledger
entries, budgets, signed heads and tenant isolation work on it unchanged. It holds no files,
is never listed and counts against no quota. Its ``num_clients`` is the number of active
nodes.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ppml.db.base import Base, utcnow

__all__ = ["Federation", "FederationNode", "FederationTask", "NodeStatus", "TaskStatus"]


class NodeStatus(StrEnum):
    INVITED = "invited"  # an enrolment token is out
    ACTIVE = "active"  # enrolled with a matching schema; holds a credential
    REFUSED = "refused"  # its data did not match the schema
    REVOKED = "revoked"  # its owner revoked it


class TaskStatus(StrEnum):
    OPEN = "open"  # waiting for the node's update
    ACCEPTED = "accepted"  # a valid update was stored
    REJECTED = "rejected"  # a malformed update (wrong shape, NaN, over the norm)
    REFUSED = "refused"  # the node declined (budget, schema, error)
    EXPIRED = "expired"  # the round closed before it answered
    STALE = "stale"  # superseded (the node was revoked, the attempt was lost)

    @property
    def terminal(self) -> bool:
        return self != TaskStatus.OPEN


class Federation(Base):
    __tablename__ = "federations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    # ppml.federation.schema.FederationSchema: classes, features or input_shape.
    data_schema: Mapped[dict[str, Any]]
    privacy_unit: Mapped[str] = mapped_column(String(16))  # record | client
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FederationNode(Base):
    __tablename__ = "federation_nodes"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    federation_id: Mapped[str] = mapped_column(ForeignKey("federations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=NodeStatus.INVITED)
    # sha256 of the enrolment token; cleared when it is used (single use).
    enrolment_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    enrolment_expires_at: Mapped[datetime | None]
    credential_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    software_version: Mapped[str | None] = mapped_column(String(64))
    last_seen: Mapped[datetime | None]
    schema_ok: Mapped[bool | None] = mapped_column(Boolean)
    rows: Mapped[int | None] = mapped_column(Integer)  # released metadata (NodeView)
    check_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class FederationTask(Base):
    __tablename__ = "federation_tasks"
    __table_args__ = (
        Index("ix_federation_tasks_node_status", "node_id", "status"),
        Index("ix_federation_tasks_job_round", "job_id", "round"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    node_id: Mapped[str] = mapped_column(ForeignKey("federation_nodes.id"))
    round: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.OPEN)
    deadline: Mapped[datetime]
    # The task JSON the node receives (ppml.federation.tasks), fixed when it is opened.
    payload: Mapped[dict[str, Any]]
    detail: Mapped[str | None] = mapped_column(Text)
    epsilon: Mapped[float | None] = mapped_column(Float)  # sample mode: what the node charged
    epsilon_total: Mapped[float | None] = mapped_column(Float)
    update_key: Mapped[str | None] = mapped_column(String(200))
    rows: Mapped[int | None] = mapped_column(Integer)  # the node's rows (FedAvg weights)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The node's first fetch of the round's weights (a sample-level node charges then).
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
