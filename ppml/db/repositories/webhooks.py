"""Webhooks: the outbox of signed job events (``ppml.jobs.webhooks`` delivers them)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update

from ppml.db.models import WebhookDelivery
from ppml.db.repositories.base import Queries

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


class WebhookQueries(Queries):
    """The webhook outbox: staged with a job's end, claimed and settled by workers."""

    def stage_webhook(
        self, *, delivery_id: str, tenant_id: str, job_id: str, url: str, body: str
    ) -> None:
        """A pending delivery, due now, in the caller's transaction (the job's end)."""
        self.stage(
            WebhookDelivery(
                id=delivery_id,
                tenant_id=tenant_id,
                job_id=job_id,
                url=url,
                body=body,
                status=PENDING,
                attempts=0,
            )
        )

    def due_webhooks(self, now: datetime, *, limit: int) -> list[WebhookDelivery]:
        """Pending deliveries whose next attempt is due, oldest first."""
        stmt = (
            select(WebhookDelivery)
            .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        )
        return list(self.session.scalars(stmt).all())

    def claim_webhook(self, delivery_id: str, *, seen: datetime, until: datetime) -> bool:
        """Hold a due delivery until ``until`` (a conditional update on the due time that was
        read): of two workers, one sends it; a worker that dies holding it lets it fall due
        again, and it is sent once more (receivers dedupe on its id)."""
        result = self.session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at == seen,
            )
            .values(next_attempt_at=until, attempts=WebhookDelivery.attempts + 1)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0) == 1)

    def settle_webhook(
        self,
        delivery_id: str,
        *,
        status: str,
        at: datetime,
        next_attempt_at: datetime | None = None,
        error: str | None = None,
        status_code: int | None = None,
    ) -> None:
        """Record an attempt: ``delivered``, ``failed`` for good, or ``pending`` again with
        the time of the next attempt."""
        values: dict[str, object] = {
            "status": status,
            "last_error": None if error is None else error[:200],
            "last_status_code": status_code,
        }
        if status == DELIVERED:
            values["delivered_at"] = at
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        self.session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )

    def webhook_of_job(self, tenant_id: str, job_id: str) -> WebhookDelivery | None:
        return self.session.scalar(
            select(WebhookDelivery).where(
                WebhookDelivery.job_id == job_id, WebhookDelivery.tenant_id == tenant_id
            )
        )

    def webhooks_by_status(self) -> dict[str, int]:
        """How many deliveries each status holds (operators' metrics)."""
        rows = self.session.execute(
            select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
        )
        return {str(status): int(count) for status, count in rows.all()}
