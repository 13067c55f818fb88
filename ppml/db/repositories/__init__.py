"""Repositories: every SQL statement of ppml lives in this package, one module per domain.

Each takes an open :class:`~sqlalchemy.orm.Session`; the caller owns the transaction.
Every tenant-owned lookup takes the tenant id, so ownership cannot be forgotten.
``Repositories`` is all of them over one session.
"""

from __future__ import annotations

from ppml.db.repositories.base import TERMINAL, Page
from ppml.db.repositories.datasets import DatasetQueries
from ppml.db.repositories.federations import FederationQueries
from ppml.db.repositories.jobs import JobQueries
from ppml.db.repositories.ledger import LedgerQueries
from ppml.db.repositories.tenants import TenantQueries
from ppml.db.repositories.webhooks import WebhookQueries

__all__ = ["TERMINAL", "Page", "Repositories"]


class Repositories(
    TenantQueries, DatasetQueries, FederationQueries, JobQueries, LedgerQueries, WebhookQueries
):
    """Typed queries over one session."""
