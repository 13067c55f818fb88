"""Webhooks: a signed POST to the job's ``webhook_url`` when it succeeds, fails or is cancelled.

Durable by an outbox: :func:`stage` writes the delivery (its exact body) in the transaction
that ends the job (``ppml.jobs.lifecycle.finish``), so a job never ends without its event and
no event exists for a job that did not end. Every worker runs a :class:`WebhookSender`, which
claims due deliveries (a conditional update, so one worker sends each attempt) and POSTs
them, never from an API request. A non-2xx answer, a timeout or a refused connection is
retried with exponential backoff (``webhooks.backoff_s`` doubled per attempt, capped, with
jitter) up to ``webhooks.max_attempts``; a worker killed mid-send lets the delivery fall due
again. Delivery is at least once: receivers dedupe on ``PPML-Delivery`` (the event's ``id``).

Signature (docs/api.md, "Webhooks")::

    PPML-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

The secret is the job's own (:func:`job_secret`), derived from the service's data key and the
job id, so nothing new is stored; it is shown once, in the answer that creates the job.
Receivers check the MAC and refuse a ``t`` older than a few minutes (:func:`verify`), which
bounds replays; each attempt is signed with its own time.

Addresses: only http(s); redirects are not followed; a host that is or resolves to a private,
loopback, link-local or otherwise non-public address is refused unless
``webhooks.allow_private_addresses`` is set (:func:`check_url`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import threading
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from ppml.config import Settings
from ppml.db.models import Job, WebhookDelivery, new_id, utcnow
from ppml.db.repositories import Repositories
from ppml.db.repositories.webhooks import DELIVERED, FAILED, PENDING
from ppml.db.session import Database
from ppml.errors import InvalidInput
from ppml.trust.sealing import DataKeys

__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "WebhookSender",
    "check_url",
    "job_secret",
    "sign",
    "stage",
    "verify",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "PPML-Signature"
DELIVERY_HEADER = "PPML-Delivery"
EVENT_HEADER = "PPML-Event"
#: What receivers should accept between the signature's time and their clock.
DEFAULT_TOLERANCE_S = 300
_BATCH = 20


# --- secrets and signatures -----------------------------------------------------------------


def job_secret(keys: DataKeys, job_id: str) -> str:
    """The job's signing secret: ``whsec_`` and 43 URL-safe base64 characters."""
    mac = hmac.new(keys.derive("webhooks"), job_id.encode(), hashlib.sha256).digest()
    return "whsec_" + base64.urlsafe_b64encode(mac).decode().rstrip("=")


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``PPML-Signature`` header of ``body`` sent at ``timestamp`` (unix seconds)."""
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify(
    secret: str,
    body: bytes,
    header: str,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """A receiver's check: the header's MAC matches ``body`` and its time is within
    ``tolerance_s`` of ``now`` (a replayed old delivery fails). Constant-time comparison."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body)
    return any(hmac.compare_digest(expected, mac) for mac in fields.get("v1", []))


# --- addresses --------------------------------------------------------------------------------


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class Unresolvable(InvalidInput):
    """The host did not resolve (perhaps for now): the attempt is retried."""


def check_url(url: str, *, allow_private: bool, resolve: bool) -> None:
    """Refuse (422, ``webhook_url``) a destination that is not public, unless allowed.

    Without ``resolve`` only what the URL says is checked (an IP literal, ``localhost``): the
    API's cheap check at submit. With it, every address the host resolves to must be public:
    the worker's check before each attempt.
    """
    if allow_private:
        return
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    refused = InvalidInput(
        "webhook_url must reach a public address (private ones need the server's "
        "webhooks.allow_private_addresses setting)",
        field="webhook_url",
    )
    if host == "localhost" or host.endswith(".localhost"):
        raise refused
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        if not resolve:
            return
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            raise Unresolvable(f"webhook_url's host does not resolve: {exc}") from None
        addresses = [str(info[4][0]) for info in infos]
    if not addresses or not all(_public(address) for address in addresses):
        raise refused


# --- the outbox ------------------------------------------------------------------------------


def _event_body(job: Job, delivery_id: str, now: datetime) -> str:
    """What the receiver gets: the job's end as every key of its tenant sees it (released
    metrics only, never exact figures; no data values)."""
    data: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "dataset_id": job.dataset_id,
        "status": job.status,
        "error": job.error.model_dump(mode="json") if job.error else None,
        "metrics": job.metrics.model_dump(mode="json") if job.metrics else None,
        "privacy": job.privacy.model_dump(mode="json") if job.privacy else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }
    event = {
        "id": delivery_id,
        "type": f"job.{job.status}",
        "created_at": now.isoformat(),
        "data": {"job": data},
    }
    return json.dumps(event, sort_keys=True, separators=(",", ":"))


def stage(repos: Repositories, job: Job) -> str | None:
    """Write the job's webhook delivery (if it names a URL) in the transaction that ends it;
    its id, or None."""
    url = job.spec.webhook_url
    if not url:
        return None
    delivery_id = new_id("whd")
    body = _event_body(job, delivery_id, utcnow())
    repos.stage_webhook(
        delivery_id=delivery_id, tenant_id=job.tenant_id, job_id=job.id, url=url, body=body
    )
    return delivery_id


# --- delivery ----------------------------------------------------------------------------------


class WebhookSender:
    """Sends due webhook deliveries; every worker runs one in a daemon thread."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.config = db, settings.webhooks
        self.keys = DataKeys.from_settings(settings)
        self._stop = threading.Event()

    def run_once(self) -> list[str]:
        """One pass: claims and sends what is due; returns the ids of the attempts made."""
        now = utcnow()
        with self.db.session() as session:
            due = [
                (d.id, d.next_attempt_at)
                for d in Repositories(session).due_webhooks(now, limit=_BATCH)
            ]
        sent = []
        # Held past one attempt's timeout: a worker that dies mid-send lets it fall due again.
        hold = timedelta(seconds=self.config.timeout_s * 2 + 30)
        for delivery_id, seen in due:
            with self.db.session(write=True) as session:
                repos = Repositories(session)
                if not repos.claim_webhook(delivery_id, seen=seen, until=utcnow() + hold):
                    continue
                delivery = repos.session.get(WebhookDelivery, delivery_id)
                assert delivery is not None
                url, body, job_id = delivery.url, delivery.body, delivery.job_id
                attempts = delivery.attempts
            self._attempt(delivery_id, url, body.encode(), job_id, attempts)
            sent.append(delivery_id)
        return sent

    def _attempt(self, delivery_id: str, url: str, body: bytes, job_id: str, attempts: int) -> None:
        code: int | None = None
        try:
            check_url(url, allow_private=self.config.allow_private_addresses, resolve=True)
        except Unresolvable as unknown:
            self._retry_or_fail(delivery_id, job_id, attempts, unknown.detail, None)
            return
        except InvalidInput as refused:
            self._settle(delivery_id, FAILED, error=refused.detail)
            log.warning("webhook %s of job %s refused: %s", delivery_id, job_id, refused.detail)
            return
        event = json.loads(body)["type"]
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "ppml-webhooks/1",
            SIGNATURE_HEADER: sign(job_secret(self.keys, job_id), body, int(time.time())),
            DELIVERY_HEADER: delivery_id,
            EVENT_HEADER: event,
        }
        try:
            response = httpx.post(
                url,
                content=body,
                headers=headers,
                timeout=self.config.timeout_s,
                follow_redirects=False,
            )
            code = response.status_code
            error = None if 200 <= code < 300 else f"HTTP {code}"
        except httpx.HTTPError as exc:
            error = f"{exc.__class__.__name__}: {exc}"
        if error is None:
            self._settle(delivery_id, DELIVERED, status_code=code)
            log.info("webhook %s of job %s delivered (%s)", delivery_id, job_id, code)
        else:
            self._retry_or_fail(delivery_id, job_id, attempts, error, code)

    def _retry_or_fail(
        self, delivery_id: str, job_id: str, attempts: int, error: str, code: int | None
    ) -> None:
        """After a failed attempt: due again after the backoff, or failed for good."""
        if attempts >= self.config.max_attempts:
            self._settle(delivery_id, FAILED, error=error, status_code=code)
            log.warning("webhook %s of job %s failed for good: %s", delivery_id, job_id, error)
            return
        delay = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** (attempts - 1))
        retry_at = utcnow() + timedelta(seconds=delay * random.uniform(0.8, 1.2))
        self._settle(delivery_id, PENDING, error=error, status_code=code, retry_at=retry_at)
        log.info("webhook %s of job %s: %s; retry at %s", delivery_id, job_id, error, retry_at)

    def _settle(
        self,
        delivery_id: str,
        status: str,
        *,
        error: str | None = None,
        status_code: int | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        with self.db.session(write=True) as session:
            Repositories(session).settle_webhook(
                delivery_id,
                status=status,
                at=utcnow(),
                next_attempt_at=retry_at,
                error=error,
                status_code=status_code,
            )

    def start(self) -> threading.Thread:
        """Run every ``webhooks.poll_s`` in a daemon thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.wait(self.config.poll_s):
                try:
                    self.run_once()
                except Exception:
                    log.exception("webhook pass failed")

        thread = threading.Thread(target=loop, name="ppml-webhooks", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
