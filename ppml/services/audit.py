"""The audit trail: who did what to which object, and when.

Each event names the actor (the API key's id and role; the admin token is ``admin`` with no
key), the action, the object and a small ``detail`` (ids, formats, counts: never a value of
the data). :func:`record` stages the event in the transaction of the action it records, so
both commit together or neither does; an action that reads (a download, a prediction) is
recorded before its answer is sent, in a statement of its own: :func:`record_async` on the
API's event loop, :func:`record_now` from a thread.
The trail is append-only: no route and no repository method updates or deletes an event.

Services take the acting principal as ``by``; None means the admin: the admin token, or an
operator calling the service in-process.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, get_args

from ppml.db.models import AuditEvent, new_id, utcnow
from ppml.db.reads import AsyncReads
from ppml.db.repositories import Page, Repositories
from ppml.db.session import Database

if TYPE_CHECKING:  # tenants records its own actions here
    from ppml.services.tenants import Principal

__all__ = [
    "ACTIONS",
    "AuditAction",
    "ObjectType",
    "events_after",
    "fields_of",
    "page",
    "record",
    "record_async",
    "record_now",
]

AuditAction = Literal[
    "tenant.create",
    "key.create",
    "key.revoke",
    "dataset.register",
    "dataset.upload",
    "dataset.delete",
    "dataset.statistics",
    "job.submit",
    "job.cancel",
    "model.download",
    "model.predict",
    "federation.create",
    "node.invite",
    "node.revoke",
]
ACTIONS: tuple[str, ...] = get_args(AuditAction)
ObjectType = Literal["tenant", "api_key", "dataset", "job", "federation", "node"]

ADMIN_ROLE = "admin"
EXPORT_BATCH = 500  # events per read while a JSON-lines export streams


def fields_of(
    by: Principal | None,
    action: AuditAction,
    object_type: ObjectType,
    object_id: str | None,
    detail: Mapping[str, Any] | None = None,
    *,
    tenant_id: str | None = None,
) -> dict[str, Any]:
    """The event's columns (not yet added): what :func:`record` stages as a row and
    :meth:`~ppml.db.repositories.Repositories.insert_audit_events` inserts in bulk. A
    principal's events belong to its tenant; the admin's to ``tenant_id`` (None: no tenant)."""
    return {
        "id": new_id("aud"),
        "tenant_id": by.tenant_id if by is not None else tenant_id,
        "actor_key_id": by.key_id if by is not None else None,
        "actor_role": by.role if by is not None else ADMIN_ROLE,
        "action": action,
        "object_type": object_type,
        "object_id": object_id,
        "detail": dict(detail or {}),
        "created_at": utcnow(),
    }


def record(
    repos: Repositories,
    by: Principal | None,
    action: AuditAction,
    object_type: ObjectType,
    object_id: str | None,
    detail: Mapping[str, Any] | None = None,
    *,
    tenant_id: str | None = None,
) -> AuditEvent:
    """Stage the event in the caller's transaction: it commits with the action, or not at all."""
    row = AuditEvent(**fields_of(by, action, object_type, object_id, detail, tenant_id=tenant_id))
    repos.stage(row)
    return row


def record_now(
    db: Database,
    by: Principal | None,
    action: AuditAction,
    object_type: ObjectType,
    object_id: str | None,
    detail: Mapping[str, Any] | None = None,
    *,
    tenant_id: str | None = None,
) -> None:
    """Record an event in a transaction of its own (actions that write nothing else).

    Raises:
        The database's transient errors: the caller answers 503 and serves nothing, so no
        download or prediction goes unrecorded.
    """
    with db.session(write=True) as session:
        record(
            Repositories(session), by, action, object_type, object_id, detail, tenant_id=tenant_id
        )


async def record_async(
    reads: AsyncReads,
    by: Principal | None,
    action: AuditAction,
    object_type: ObjectType,
    object_id: str | None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """:func:`record_now` for the API's event loop: on PostgreSQL one ``INSERT`` over the
    asynchronous pool, no worker thread and no ORM session (``ppml.db.reads``); elsewhere
    :func:`record_now`'s transaction in a thread. Raises as it does. The row goes to the
    pool as its columns: an ORM object's construction would cost more than the ``INSERT``'s
    own work here."""
    await reads.append_audit(fields_of(by, action, object_type, object_id, detail))


def page(
    repos: Repositories,
    tenant_id: str,
    *,
    action: str | None = None,
    object_id: str | None = None,
    page_size: int,
    page_token: str | None = None,
) -> Page:
    """One page of the tenant's trail, oldest first."""
    return repos.list_audit(
        tenant_id, action=action, object_id=object_id, page_size=page_size, page_token=page_token
    )


def events_after(
    db: Database,
    tenant_id: str,
    *,
    action: str | None = None,
    object_id: str | None = None,
    after: str | None = None,
    batch: int = EXPORT_BATCH,
) -> Iterator[list[AuditEvent]]:
    """The tenant's whole trail after the event ``after`` (None: from the start), oldest
    first, in batches, each read in a short transaction of its own (an export holds no
    transaction open while its client reads)."""
    while True:
        with db.read_one() as session:
            rows, token = page(
                Repositories(session),
                tenant_id,
                action=action,
                object_id=object_id,
                page_size=batch,
                page_token=after,
            )
        if rows:
            yield rows
        if token is None:
            return
        after = token
