"""Federations of remote data-owner nodes (#16): the owner's side and the server loop's.

A federation is a schema, a privacy unit and a *backing dataset* row that jobs name: a
client-unit federation's budget is that row's DatasetBudget, charged by today's ledger; a
record-unit federation has no service-side budget (each node's own ledger is its budget).
The backing row holds no files, is never listed, counts against no quota, and its
``num_clients`` / ``num_train`` follow the active nodes and their reported rows.

The server loop (worker) opens a round's tasks, reads them back, and closes the round
(:func:`open_tasks`, :func:`round_tasks`, :func:`close_round`, :func:`mark_stale`); the
node API answers them (:mod:`ppml.services.nodes`).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ppml.db.federations import (
    Federation,
    FederationNode,
    FederationTask,
    NodeStatus,
    TaskStatus,
)
from ppml.db.models import Dataset, DatasetStatus, new_id, utcnow
from ppml.db.repositories import Repositories
from ppml.errors import Conflict, InvalidInput, NotFound
from ppml.federation.schema import FederationSchema
from ppml.federation.tasks import task_payload
from ppml.privacy.ledger import Ledger
from ppml.services import audit
from ppml.services.datasets import BudgetRequest
from ppml.services.tenants import Principal, require_owner
from ppml.specs import JobSpec

__all__ = [
    "ENROLMENT_PREFIX",
    "ENROLMENT_TTL",
    "ONLINE_WITHIN",
    "Invitation",
    "add_node",
    "close_round",
    "create_federation",
    "get_federation",
    "hash_secret",
    "mark_stale",
    "open_tasks",
    "revoke_node",
    "round_tasks",
]

ENROLMENT_PREFIX = "ppml_enrol_"
ENROLMENT_TTL = timedelta(hours=24)
#: A node seen this recently is shown online.
ONLINE_WITHIN = timedelta(seconds=30)


def hash_secret(secret: str) -> str:
    """Tokens and credentials are 256-bit random strings: a fast hash is enough."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_federation(
    repos: Repositories,
    *,
    tenant_id: str,
    name: str,
    schema: FederationSchema,
    privacy_unit: str,
    budget: BudgetRequest | None,
    by: Principal | None = None,
) -> Federation:
    """A federation and its backing dataset (and, client unit, its budget).

    Raises:
        Forbidden: ``by`` is an analyst's key.
        InvalidInput: a client-unit federation without a budget, or a record-unit one with.
    """
    if by is not None:
        require_owner(by, "creating a federation needs an owner key")
    if privacy_unit == "client" and budget is None:
        raise InvalidInput(
            "a client-unit federation needs a budget: its jobs are charged there",
            field="budget",
        )
    if privacy_unit == "record" and budget is not None:
        raise InvalidInput(
            "a record-unit federation takes no budget: each node's own ledger is the budget "
            "of its rows",
            field="budget",
        )
    federation_id, dataset_id = new_id("fed"), new_id("ds")
    dataset = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=f"federation {name}",
        source={"federation": federation_id},
        task="classification",
        num_features=schema.num_features,
        num_classes=len(schema.classes),
        num_train=0,
        num_test=0,
        num_clients=0,
        num_test_clients=0,
        classes={"labels": list(schema.classes)},
        data_schema=schema.model_dump(mode="json", exclude_none=True),
        privacy_unit=privacy_unit,
        epsilon_total=budget.epsilon if budget else None,
        delta_total=budget.delta if budget else None,
        storage_key="",
        status=DatasetStatus.READY,
        stored_bytes=0,
        federation_backing=True,
    )
    federation = Federation(
        id=federation_id,
        tenant_id=tenant_id,
        name=name,
        data_schema=schema.model_dump(mode="json", exclude_none=True),
        privacy_unit=privacy_unit,
        dataset_id=dataset_id,
    )
    repos.add(dataset)
    repos.add(federation)
    if budget is not None:
        Ledger(repos).open_budget(
            dataset_id=dataset_id,
            epsilon_total=budget.epsilon,
            delta_total=budget.delta,
            unit=privacy_unit,
        )
    detail = {"privacy_unit": privacy_unit, "budgeted": budget is not None}
    audit.record(
        repos, by, "federation.create", "federation", federation_id, detail, tenant_id=tenant_id
    )
    return federation


def get_federation(repos: Repositories, tenant_id: str, federation_id: str) -> Federation:
    """The tenant's federation (another tenant's id is not found)."""
    federation = repos.federation(tenant_id, federation_id)
    if federation is None:
        raise NotFound("federation not found")
    return federation


@dataclass(frozen=True)
class Invitation:
    node: FederationNode
    enrolment_token: str  # shown once
    expires_at: datetime


def add_node(
    repos: Repositories,
    *,
    tenant_id: str,
    federation_id: str,
    name: str,
    by: Principal | None = None,
) -> Invitation:
    """An invited node and its single-use enrolment token (stored hashed, shown once)."""
    federation = get_federation(repos, tenant_id, federation_id)
    if by is not None:
        require_owner(by, "inviting a node needs an owner key")
    token = ENROLMENT_PREFIX + secrets.token_urlsafe(32)
    expires_at = utcnow() + ENROLMENT_TTL
    node = FederationNode(
        id=new_id("nod"),
        federation_id=federation.id,
        name=name,
        status=NodeStatus.INVITED,
        enrolment_token_hash=hash_secret(token),
        enrolment_expires_at=expires_at,
    )
    repos.add(node)
    audit.record(
        repos,
        by,
        "node.invite",
        "node",
        node.id,
        {"federation_id": federation.id},
        tenant_id=tenant_id,
    )
    return Invitation(node=node, enrolment_token=token, expires_at=expires_at)


def revoke_node(
    repos: Repositories,
    *,
    tenant_id: str,
    federation_id: str,
    node_id: str,
    by: Principal | None = None,
) -> None:
    """Revoke a node: its credential and enrolment token stop working at once, its open
    tasks become ``stale``. Revoking a revoked node changes nothing."""
    federation = get_federation(repos, tenant_id, federation_id)
    node = repos.federation_node(federation.id, node_id)
    if node is None:
        raise NotFound("node not found")
    if by is not None:
        require_owner(by, "revoking a node needs an owner key")
    if node.status == NodeStatus.REVOKED:
        return
    now = utcnow()
    node.status, node.revoked_at = NodeStatus.REVOKED, now
    node.credential_hash, node.enrolment_token_hash = None, None
    repos.session.flush()
    repos.close_open_tasks(TaskStatus.STALE, now=now, node_id=node.id, detail="node revoked")
    repos.refresh_backing_counts(federation)
    audit.record(
        repos,
        by,
        "node.revoke",
        "node",
        node.id,
        {"federation_id": federation.id},
        tenant_id=tenant_id,
    )


# --- the server loop's side ----------------------------------------------------------------


def open_tasks(
    repos: Repositories,
    *,
    job_id: str,
    spec: JobSpec,
    federation: Federation,
    round_: int,
    nodes: Sequence[FederationNode],
    deadline: datetime,
    weights_sha256: str,
    attempt: int = 0,
) -> list[FederationTask]:
    """Open one task per chosen node for ``round_``.

    The global weights must be stored at ``ppml.federation.keys.global_key(job_id, round_)``
    first; ``weights_sha256`` is the SHA-256 of their plain bytes, which nodes download and
    check (not ``Artifact.sha256``: the store seals the ``federations`` kind at rest).
    """
    if deadline.tzinfo is None:
        raise ValueError("naive deadline")
    schema = FederationSchema.model_validate(federation.data_schema)
    tasks = []
    for node in nodes:
        task_id = new_id("tsk")
        payload = task_payload(
            task_id=task_id,
            job_id=job_id,
            spec=spec,
            schema=schema,
            round_=round_,
            deadline=deadline,
            weights_sha256=weights_sha256,
            rows=node.rows,
        )
        tasks.append(
            FederationTask(
                id=task_id,
                job_id=job_id,
                node_id=node.id,
                round=round_,
                attempt=attempt,
                status=TaskStatus.OPEN,
                deadline=deadline,
                payload=payload,
            )
        )
    repos.add(*tasks)
    return tasks


def round_tasks(repos: Repositories, job_id: str, round_: int) -> Sequence[FederationTask]:
    """Every task of a round (all attempts), oldest first."""
    return repos.round_tasks(job_id, round_)


def close_round(repos: Repositories, job_id: str, round_: int) -> int:
    """The round's tasks still open become ``expired`` (later updates answer 409)."""
    return repos.close_open_tasks(
        TaskStatus.EXPIRED, now=utcnow(), job_id=job_id, round_=round_, detail="round closed"
    )


def mark_stale(repos: Repositories, job_id: str, *, detail: str = "attempt superseded") -> int:
    """Every open task of the job becomes ``stale`` (a resumed attempt, a cancelled job)."""
    return repos.close_open_tasks(TaskStatus.STALE, now=utcnow(), job_id=job_id, detail=detail)


def require_active_nodes(repos: Repositories, federation: Federation) -> Sequence[FederationNode]:
    """The federation's active nodes (409 when none has enrolled)."""
    nodes = repos.active_nodes(federation.id)
    if not nodes:
        raise Conflict(f"federation {federation.name} has no active node yet")
    return nodes
