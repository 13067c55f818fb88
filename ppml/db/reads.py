"""Point reads for the API's hottest path (``GET /v1/jobs/{id}``) without a worker thread.

A poll through the synchronous engine waits twice for a thread and the GIL (into the
thread pool and back) and builds an ORM session around one ``SELECT``. On PostgreSQL this
module runs the same ``SELECT`` on the event loop over an asynchronous psycopg pool, and
turns the row into a detached ``Job`` with the column types' own result processing, so
callers get what the ORM would give them. SQLite has no asynchronous driver here: there the
read runs in a worker thread through the ORM, as before.

The pool opens in the app's lifespan; until it is open (or after it closed), reads take the
thread path, so behaviour never depends on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg
from anyio import to_thread
from sqlalchemy import bindparam, select
from sqlalchemy.engine import make_url

from ppml.db.models import Job
from ppml.db.repositories import Repositories
from ppml.db.session import Database

__all__ = ["APPLICATION_NAME", "AsyncReads"]

APPLICATION_NAME = "ppml-api-reads"  # how the pool's connections show in pg_stat_activity

log = logging.getLogger(__name__)


class AsyncReads:
    """``await reads.job(tenant_id, job_id)``: the tenant's job, or None."""

    def __init__(self, db: Database, *, size: int = 8, wait_s: float = 3.0) -> None:
        # wait_s: how long a read waits for a free connection. Reads take well under a
        # millisecond, so a longer wait means the database is gone or the API is swamped:
        # PoolTimeout, which the API answers with 503 rather than holding the client.
        self.db, self.size, self.wait_s = db, size, wait_s
        self._pool: Any = None  # psycopg_pool.AsyncConnectionPool once open
        table = Job.__table__
        columns = list(table.columns)
        self._names = [c.key for c in columns]
        # Rendered by SQLAlchemy once, so the statement stays the model's (quoting, names),
        # with psycopg's named placeholders.
        stmt = select(*columns).where(
            table.c.id == bindparam("job_id"), table.c.tenant_id == bindparam("tenant_id")
        )
        self._sql = str(stmt.compile(dialect=db.engine.dialect))
        self._processors: list[Callable[[Any], Any] | None] = [
            _processor(c.type, db.engine.dialect) for c in columns
        ]

    @property
    def asynchronous(self) -> bool:
        return self._pool is not None

    async def open(self) -> None:
        """Open the pool (PostgreSQL only; a no-op on SQLite)."""
        if self.db.is_sqlite or self._pool is not None:
            return
        from psycopg_pool import AsyncConnectionPool

        url = make_url(self.db.url).set(drivername="postgresql")
        pool = AsyncConnectionPool(
            url.render_as_string(hide_password=False),
            min_size=self.size,
            max_size=self.size,
            open=False,
            timeout=self.wait_s,
            # One statement, its own snapshot: no BEGIN/COMMIT round trips (as read_one).
            # No check query per checkout (a round trip per poll): see _fetch.
            kwargs={"autocommit": True, "application_name": APPLICATION_NAME},
            name="ppml-reads",
        )
        try:
            await pool.open(wait=True, timeout=10)
        except Exception:  # the app still serves: reads take the thread path
            log.warning("async read pool did not open; job reads use threads", exc_info=True)
            await pool.close()
            return
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def job(self, tenant_id: str, job_id: str) -> Job | None:
        pool = self._pool
        if pool is None:
            return await to_thread.run_sync(self._job_in_thread, tenant_id, job_id)
        row = await self._fetch(pool, {"job_id": job_id, "tenant_id": tenant_id})
        if row is None:
            return None
        values = {
            name: value if proc is None else proc(value)
            for name, value, proc in zip(self._names, row, self._processors, strict=True)
        }
        return Job(**values)

    async def _fetch(self, pool: Any, params: dict[str, str]) -> Any:
        try:
            return await self._fetch_once(pool, params)
        except psycopg.OperationalError:
            # The server dropped connections (a restart, an idle timeout): the broken one
            # leaves the pool on return; check() drops the other dead idle ones, and the
            # retry waits for a fresh connection.
            await pool.check()
            return await self._fetch_once(pool, params)

    async def _fetch_once(self, pool: Any, params: dict[str, str]) -> Any:
        async with pool.connection() as conn:
            cursor = await conn.execute(self._sql, params, prepare=True)
            return await cursor.fetchone()

    def _job_in_thread(self, tenant_id: str, job_id: str) -> Job | None:
        with self.db.read_one() as session:
            return Repositories(session).job(tenant_id, job_id)


def _processor(type_: Any, dialect: Any) -> Callable[[Any], Any] | None:
    """The column type's result processing (e.g. UTC datetimes), as the ORM applies it."""
    processor: Callable[[Any], Any] | None = type_.result_processor(dialect, None)
    return processor
