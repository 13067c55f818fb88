"""Tenants, API keys, the audit trail and health checks."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, bindparam, case, func, select, text, update

from ppml.db.models import (
    ADMITTED_COMPUTE_CAP,
    ApiKey,
    AuditEvent,
    Job,
    Tenant,
)
from ppml.db.repositories.base import Page, Queries

# Built once: admission runs it under the tenant's lock, where building it anew each time
# (expressions, coercions, a cache key) was a good part of what the lock was held for.
_LOCK_TENANT_ADMITTING = (
    update(Tenant)
    .where(Tenant.id == bindparam("tenant_id"))
    .values(
        admitted_jobs=Tenant.admitted_jobs + bindparam("jobs", type_=BigInteger),
        # Saturates instead of overflowing (compared, never added past the cap).
        admitted_compute=case(
            (
                Tenant.admitted_compute > bindparam("below_cap", type_=BigInteger),
                bindparam("cap", type_=BigInteger),
            ),
            else_=Tenant.admitted_compute + bindparam("compute", type_=BigInteger),
        ),
    )
    .returning(Tenant.admitted_jobs, Tenant.admitted_compute)
    .execution_options(synchronize_session=False)
)


class TenantQueries(Queries):
    """Tenants, keys, audit events."""

    # --- health -----------------------------------------------------------------------
    def ping(self) -> None:
        """A round trip to the database (readiness)."""
        self.session.execute(text("SELECT 1"))

    def jobs_by_status(self) -> dict[str, int]:
        """How many jobs each status holds (operators' metrics)."""
        rows = self.session.execute(select(Job.status, func.count()).group_by(Job.status))
        return {str(status): int(count) for status, count in rows.all()}

    # --- tenants and keys -------------------------------------------------------------
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

    def lock_tenant_admitting(
        self, tenant_id: str, jobs: int, compute: int
    ) -> tuple[int, int] | None:
        """Lock the tenant's row as :meth:`lock_tenant` does (an ``UPDATE`` of columns that
        are no key takes the same ``FOR NO KEY UPDATE`` lock), adding ``jobs`` and
        ``compute`` to its admission counters; returns the counters as they were before, or
        None (no such tenant, or a compute counter at its cap). One statement."""
        cap = ADMITTED_COMPUTE_CAP
        params = {
            "tenant_id": tenant_id,
            "jobs": jobs,
            "compute": compute,
            "cap": cap,
            "below_cap": cap - compute,
        }
        row = self.session.execute(_LOCK_TENANT_ADMITTING, params).first()
        if row is None or row[1] >= cap:
            return None
        return int(row[0]) - jobs, int(row[1]) - compute

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

    # --- audit trail (append-only: no statement here updates or deletes a row) ----------
    def insert_audit_events(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert events given as their columns (``ppml.services.audit.fields_of``) in one
        bulk statement, now: many events of one transaction cost no ORM objects."""
        if rows:
            self.insert_rows(AuditEvent, rows)

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
