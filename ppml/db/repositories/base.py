"""What every repository shares: the session, staging, keyset pagination."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.orm import Session

from ppml.db.models import Base, JobStatus

__all__ = ["TERMINAL", "Page", "Queries"]

Page = tuple[list[Any], str | None]

TERMINAL = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]


class Queries:
    """Typed queries over one session; the caller owns the transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, *objects: Any) -> None:
        self.session.add_all(objects)
        self.session.flush()

    def stage(self, *objects: Any) -> None:
        """Add without flushing: the next query or the commit writes them, in one flush."""
        self.session.add_all(objects)

    def insert_rows(self, model: type[Base], rows: Sequence[dict[str, Any]]) -> None:
        """Insert rows given as their columns, now: what ``session.execute(insert(model),
        rows)`` (the ORM's bulk insert) writes, as plain Core inserts, at a fraction of its
        cost. As there, the staged rows are flushed first, and a column whose value is None
        is left out (so it stays SQL NULL, not JSON ``null``, or takes its default): one
        statement per set of columns present."""
        self.session.flush()
        table = model.__table__
        assert isinstance(table, Table)  # a mapped class's, not the ORM entity
        statement = insert(table)
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            present = {key: value for key, value in row.items() if value is not None}
            groups.setdefault(tuple(present), []).append(present)
        for group in groups.values():
            self.session.execute(statement, group)

    @contextmanager
    def pipelined(self) -> Iterator[None]:
        """Send the block's statements to PostgreSQL together and wait once for all of them
        (psycopg's pipeline mode), for writes whose results nobody reads: the bulk inserts of
        a batch of admissions, one round trip instead of one each while the locks are held.
        Staged rows are flushed first. Elsewhere (SQLite: no round trips) a plain block."""
        self.session.flush()
        connection = self.session.connection()
        if connection.dialect.name != "postgresql":
            yield
            return
        driver = connection.connection.driver_connection
        assert driver is not None
        with driver.pipeline():
            yield

    # --- helpers ----------------------------------------------------------------------
    def _page(
        self,
        stmt: Any,
        key: Any,
        page_size: int,
        page_token: Any,
        *,
        descending: bool = True,
    ) -> Page:
        """Keyset pagination on ``key`` (a creation-ordered id, or a ledger's ``seq``); the
        token is the ``key`` of the last row served."""
        if page_token is not None:
            stmt = stmt.where(key < page_token if descending else key > page_token)
        stmt = stmt.order_by(key.desc() if descending else key.asc()).limit(page_size + 1)
        rows = list(self.session.scalars(stmt).all())
        if len(rows) > page_size:
            rows = rows[:page_size]
            return rows, str(getattr(rows[-1], key.key))
        return rows, None
