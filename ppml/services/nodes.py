"""The node API's side of federations (#16): enrolment, credentials, polls and updates.

Nodes connect outbound only. An invited node exchanges its single-use enrolment token for
a credential (``ppml_node_<secret>``, stored as its SHA-256) if its data matches the
federation's schema; a node whose data does not match is refused, and its token is used up.

Every function opens its own short transactions (a refusal is recorded and committed before
the error is raised; a long poll holds no connection while it waits).
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppml.db.federations import Federation, FederationNode, NodeStatus, TaskStatus
from ppml.db.models import utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import NotFound, PayloadTooLarge, SchemaMismatch, StaleUpdate, Unauthorized
from ppml.federation.keys import global_key, update_key
from ppml.federation.updates import MalformedUpdate, check_update, read_header, tensor_shapes
from ppml.services.federations import hash_secret
from ppml.storage import ArtifactStore

__all__ = [
    "CREDENTIAL_PREFIX",
    "UPDATE_SLACK_BYTES",
    "Enrolled",
    "NodePrincipal",
    "SchemaCheck",
    "accept_update",
    "check_credential",
    "enrol",
    "federation_for_token",
    "hello",
    "open_task",
    "poll_once",
    "refuse_task",
    "weights_key",
]

CREDENTIAL_PREFIX = "ppml_node_"
#: An update may be this much larger than the global weights (its header and metadata).
UPDATE_SLACK_BYTES = 64 * 1024
INVALID_TOKEN = "unknown, expired or already used enrolment token"


@dataclass(frozen=True, slots=True)
class NodePrincipal:
    """Who a node credential acts for."""

    node_id: str
    federation_id: str
    tenant_id: str


@dataclass(frozen=True, kw_only=True)
class SchemaCheck:
    """What a node found checking its data against the schema (rows: released metadata)."""

    ok: bool
    rows: int | None
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class Enrolled:
    node_id: str
    credential: str  # shown once
    federation: Federation


def _record_check(node: FederationNode, version: str, check: SchemaCheck) -> None:
    node.software_version = version
    node.schema_ok, node.rows, node.check_message = check.ok, check.rows, check.message
    node.last_seen = utcnow()


def _mismatch(federation: Federation, check: SchemaCheck) -> SchemaMismatch:
    return SchemaMismatch(
        f"this node's data does not match federation {federation.name}'s schema: "
        f"{check.message or 'no reason given'}",
        field="schema_check",
    )


def check_credential(repos: Repositories, credential: str) -> NodePrincipal | None:
    """The active node behind a credential, or None."""
    if not credential.startswith(CREDENTIAL_PREFIX):
        return None
    node = repos.node_by_credential_hash(hash_secret(credential))
    if node is None or node.status != NodeStatus.ACTIVE:
        return None
    federation = repos.federation_by_id(node.federation_id)
    assert federation is not None
    return NodePrincipal(
        node_id=node.id, federation_id=federation.id, tenant_id=federation.tenant_id
    )


def _invited(repos: Repositories, token: str, *, lock: bool) -> FederationNode:
    node = None
    if token.startswith("ppml_enrol_"):
        node = repos.node_by_enrolment_hash(hash_secret(token), lock=lock)
    expires = None if node is None else node.enrolment_expires_at
    if node is None or node.status != NodeStatus.INVITED or expires is None or expires <= utcnow():
        raise Unauthorized(INVALID_TOKEN)
    return node


def federation_for_token(db: Database, token: str) -> Federation:
    """The federation an enrolment token invites to (the token is not consumed)."""
    with db.read_one() as session:
        repos = Repositories(session)
        node = _invited(repos, token, lock=False)
        federation = repos.federation_by_id(node.federation_id)
    assert federation is not None
    return federation


def enrol(db: Database, *, token: str, software_version: str, check: SchemaCheck) -> Enrolled:
    """Use up the token: an active node with a new credential, or a refused one.

    Raises:
        Unauthorized: the token is unknown, expired or used.
        SchemaMismatch: the node's data does not match (the refusal is committed first).
    """
    credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
    with db.session(write=True) as session:
        repos = Repositories(session)
        node = _invited(repos, token, lock=True)
        federation = repos.federation_by_id(node.federation_id)
        assert federation is not None
        node.enrolment_token_hash, node.enrolment_expires_at = None, None
        _record_check(node, software_version, check)
        if check.ok:
            node.status, node.credential_hash = NodeStatus.ACTIVE, hash_secret(credential)
        else:
            node.status = NodeStatus.REFUSED
        session.flush()
        repos.refresh_backing_counts(federation)
        node_id = node.id
    if not check.ok:
        raise _mismatch(federation, check)
    return Enrolled(node_id=node_id, credential=credential, federation=federation)


def hello(
    db: Database, node: NodePrincipal, *, software_version: str, check: SchemaCheck
) -> Federation:
    """A (re)started node reports its version and check; a failed check refuses the node
    (its credential stops working, its open tasks become stale)."""
    with db.session(write=True) as session:
        repos = Repositories(session)
        row = repos.node_by_id(node.node_id, lock=True)
        federation = repos.federation_by_id(node.federation_id)
        assert row is not None and federation is not None
        if row.status != NodeStatus.ACTIVE:  # revoked since the request was authenticated
            raise Unauthorized("this node's credential was revoked")
        _record_check(row, software_version, check)
        if not check.ok:
            row.status, row.credential_hash = NodeStatus.REFUSED, None
            repos.close_open_tasks(
                TaskStatus.STALE, now=utcnow(), node_id=row.id, detail="node refused"
            )
        session.flush()
        repos.refresh_backing_counts(federation)
    if not check.ok:
        raise _mismatch(federation, check)
    return federation


def poll_once(db: Database, node: NodePrincipal, *, touch: bool = True) -> dict[str, Any] | None:
    """The node's oldest open task whose deadline has not passed, or None; ``touch`` marks
    the node seen (the first look of a long poll: its later looks only read, so a waiting
    node costs one indexed read per look, not a write transaction)."""
    now = utcnow()
    if not touch:
        with db.read_one() as session:
            task = Repositories(session).oldest_open_task(node.node_id, now=now)
            return None if task is None else dict(task.payload)
    with db.session(write=True) as session:
        repos = Repositories(session)
        repos.touch_node(node.node_id, now=now)
        task = repos.oldest_open_task(node.node_id, now=now)
        return None if task is None else dict(task.payload)


def open_task(db: Database, node: NodePrincipal, task_id: str) -> tuple[str, int, dict[str, Any]]:
    """``(job_id, round, payload)`` of the node's task while it is open.

    Raises:
        NotFound: not this node's task.
        StaleUpdate: the task is no longer open, or its deadline passed.
    """
    with db.read_one() as session:
        task = Repositories(session).node_task(node.node_id, task_id)
    if task is None:
        raise NotFound("task not found")
    if task.status != TaskStatus.OPEN or task.deadline <= utcnow():
        raise StaleUpdate(f"task {task_id} is {task.status}, not open", task_status=task.status)
    return task.job_id, task.round, dict(task.payload)


def weights_key(db: Database, node: NodePrincipal, task_id: str) -> str:
    """The store key of the global weights an open task trains from. The first fetch marks
    the task started: a sample-level node charges the round right after it, so the server
    counts the round as spent by the node from then on (the receipt's per-node ε)."""
    job_id, round_, _ = open_task(db, node, task_id)
    with db.session(write=True) as session:
        Repositories(session).mark_task_started(task_id, now=utcnow())
    return global_key(job_id, round_)


def _expected_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = read_header(struct.pack("<Q", size) + handle.read(size))
    return {name: shape for name, (_, shape) in tensor_shapes(header).items()}


def accept_update(
    db: Database, store: ArtifactStore, node: NodePrincipal, task_id: str, body: bytes
) -> None:
    """Check and store an update, then mark the task accepted.

    Raises:
        NotFound, StaleUpdate: see :func:`open_task` (also when the round closed meanwhile).
        PayloadTooLarge: more than the model's bytes plus 64 KiB.
        MalformedUpdate: the task is marked ``rejected`` with the reason (committed).
    """
    job_id, round_, payload = open_task(db, node, task_id)
    with store.open_plain(global_key(job_id, round_)) as weights:
        limit = weights.stat().st_size + UPDATE_SLACK_BYTES
        expected = _expected_shapes(weights)
    if len(body) > limit:
        raise PayloadTooLarge(f"an update of this model is at most {limit} bytes", limit=limit)
    privacy = payload.get("privacy") or {}
    clip = privacy.get("clip_norm") if payload.get("mode") == "client" else None
    try:
        checked = check_update(body, expected, clip_norm=clip)
        if payload.get("mode") == "sample" and checked.epsilon is None:
            raise MalformedUpdate("a sample-mode update must report __metadata__.epsilon")
    except MalformedUpdate as refusal:
        with db.session(write=True) as session:
            Repositories(session).finish_task(
                task_id, TaskStatus.REJECTED, now=utcnow(), detail=refusal.detail
            )
        raise
    key = update_key(job_id, round_, node.node_id, secrets.token_hex(8))
    store.write(key, lambda path: path.write_bytes(body))
    with db.session(write=True) as session:
        repos = Repositories(session)
        row = repos.node_by_id(node.node_id)
        accepted = repos.finish_task(
            task_id,
            TaskStatus.ACCEPTED,
            now=utcnow(),
            update_key=key,
            epsilon=checked.epsilon,
            epsilon_total=checked.epsilon_total,
            rows=None if row is None else row.rows,
        )
    if not accepted:
        store.delete(key)
        raise StaleUpdate(f"task {task_id} closed before the update arrived")


def refuse_task(
    db: Database, node: NodePrincipal, task_id: str, *, reason: str, message: str
) -> None:
    """The node declines the task (budget, schema, error): it becomes ``refused``."""
    open_task(db, node, task_id)
    with db.session(write=True) as session:
        done = Repositories(session).finish_task(
            task_id, TaskStatus.REFUSED, now=utcnow(), detail=f"{reason}: {message}"
        )
    if not done:
        raise StaleUpdate(f"task {task_id} is no longer open")
