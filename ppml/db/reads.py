"""Point reads for the API's hottest paths (``GET /v1/jobs/{id}``, the job's event stream),
and the audit row a download or a prediction writes, without a worker thread.

A poll through the synchronous engine waits twice for a thread and the GIL (into the
thread pool and back) and builds an ORM session around one ``SELECT``. On PostgreSQL this
module runs the same ``SELECT`` on the event loop over an asynchronous psycopg pool, and
turns the row into a detached ``Job`` (or ``JobEvent``) with the column types' own result
processing, so callers get what the ORM would give them. An audit event is appended the same
way: an ``INSERT`` of the model's table committed before the caller goes on, with the
columns' own bind processing (the row the ORM would have written); the events of concurrent
requests share one statement (:class:`_Batches`). SQLite has no asynchronous driver
here: there the read runs in a worker thread through the ORM, as before.

The pool opens in the app's lifespan; until it is open (or after it closed), reads take the
thread path, so behaviour never depends on it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple

import psycopg
from anyio import to_thread
from psycopg.types.json import Json as PgJson
from psycopg.types.json import Jsonb, set_json_loads
from sqlalchemy import JSON, bindparam, select
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.engine import Dialect, make_url

from ppml.db.base import Typed, detached
from ppml.db.models import AuditEvent, Job, JobEvent
from ppml.db.repositories import Repositories
from ppml.db.session import Database

__all__ = ["APPLICATION_NAME", "EVENT_BATCH", "AsyncReads", "EventHead"]

APPLICATION_NAME = "ppml-api-reads"  # how the pool's connections show in pg_stat_activity
EVENT_BATCH = 500  # events per read of a job's stream

log = logging.getLogger(__name__)


class EventHead(NamedTuple):
    """What an event stream polls: the job's status and the seq of its newest event."""

    status: str
    last_event_seq: int


class _Select:
    """One ``SELECT`` of table columns, rendered once by SQLAlchemy (so the statement stays
    the model's: quoting, names) with psycopg's named placeholders, and the columns' result
    processing to apply to its rows."""

    def __init__(self, stmt: Any, columns: Sequence[Any], dialect: Dialect) -> None:
        self.sql = str(stmt.compile(dialect=dialect))
        self.names = [c.key for c in columns]
        self.processors = [_processor(c.type, dialect) for c in columns]

    def values(self, row: Sequence[Any]) -> dict[str, Any]:
        # SQL NULL is None whatever the column (a bulk insert leaves a JSON column SQL NULL
        # where the ORM's insert of the same row wrote JSON null)
        return {
            name: value if proc is None or value is None else proc(value)
            for name, value, proc in zip(self.names, row, self.processors, strict=True)
        }


class _Insert:
    """``INSERT`` statements (PostgreSQL's: only the pool runs them) of every column of a
    table, of 1 to ``most`` rows each, rendered once per row count, with the columns' bind
    processing (JSON, UTC datetimes) applied to the rows' values."""

    def __init__(self, table: Any, dialect: Dialect, *, most: int = 32) -> None:
        self.table, self.dialect, self.most = table, dialect, most
        processors = [(c.key, _bind_processor(c.type, dialect)) for c in table.columns]
        # each row's parameters: (column, parameter name, bind processing)
        self._names = [[(key, f"{key}_{i}", proc) for key, proc in processors] for i in range(most)]
        self._sql: dict[int, str] = {}

    def sql(self, rows: int) -> str:
        """The statement inserting ``rows`` rows (parameters named ``{column}_{row}``)."""
        sql = self._sql.get(rows)
        if sql is None:
            table = self.table
            values: list[dict[str, Any]] = [
                {key: bindparam(name) for key, name, _ in self._names[i]} for i in range(rows)
            ]
            # A retry after a dropped connection may find its rows written: the ids say so.
            stmt = insert(table).values(values).on_conflict_do_nothing(index_elements=[table.c.id])
            sql = self._sql[rows] = str(stmt.compile(dialect=self.dialect))
        return sql

    def params(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The statement's parameters for the rows' column values (every column named)."""
        params = {}
        for names, values in zip(self._names, rows, strict=False):
            for key, name, proc in names:
                value = values[key]
                params[name] = value if proc is None or value is None else proc(value)
        return params


class _Batches:
    """Rows appended by concurrent requests, inserted together by ``insert``.

    A row that finds no insert under way starts one at once; the rows that arrive while it
    runs wait for it, then go together in the next statement (at most ``most`` rows each).
    Each statement commits on its own (autocommit), and each caller's await returns once
    the statement holding its row has committed, or raises that statement's error: a caller
    serves nothing whose row is not committed, as with a statement of its own.
    """

    def __init__(
        self, insert: Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]], most: int
    ) -> None:
        self._insert, self._most = insert, most
        self._waiting: list[tuple[Mapping[str, Any], asyncio.Future[None]]] = []
        self._drain: asyncio.Task[None] | None = None

    async def append(self, row: Mapping[str, Any]) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((row, done))
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drained())
        await done

    async def _drained(self) -> None:
        batch: list[tuple[Mapping[str, Any], asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self._most], self._waiting[self._most :]
                try:
                    await self._insert([row for row, _ in batch])
                except Exception as exc:
                    _settle(batch, exc)
                else:
                    _settle(batch, None)
                batch = []
        except BaseException as exc:  # cancelled (the loop shuts down): no caller waits forever
            _settle(batch + self._waiting, exc)
            self._waiting = []
            raise
        finally:
            self._drain = None


def _settle(
    batch: Sequence[tuple[Mapping[str, Any], asyncio.Future[None]]], error: BaseException | None
) -> None:
    for _, done in batch:
        if done.done():  # its caller went away
            continue
        if error is None:
            done.set_result(None)
        elif isinstance(error, asyncio.CancelledError):
            done.cancel()
        else:
            done.set_exception(error)


class AsyncReads:
    """``await reads.job(tenant_id, job_id)``: the tenant's job, or None; the event stream's
    :meth:`event_head` and :meth:`job_events`."""

    def __init__(self, db: Database, *, size: int = 8, wait_s: float = 3.0) -> None:
        # wait_s: how long a read waits for a free connection. Reads take well under a
        # millisecond, so a longer wait means the database is gone or the API is swamped:
        # PoolTimeout, which the API answers with 503 rather than holding the client.
        self.db, self.size, self.wait_s = db, size, wait_s
        self._pool: Any = None  # psycopg_pool.AsyncConnectionPool once open
        dialect = db.engine.dialect
        jobs, events = Job.__table__, JobEvent.__table__
        owned = (jobs.c.id == bindparam("job_id")) & (jobs.c.tenant_id == bindparam("tenant_id"))
        self._job = _Select(select(*jobs.columns).where(owned), list(jobs.columns), dialect)
        head = [jobs.c.status, jobs.c.last_event_seq]
        self._head = _Select(select(*head).where(owned), head, dialect)
        after = (events.c.job_id == bindparam("job_id")) & (events.c.seq > bindparam("after"))
        self._events = _Select(
            select(*events.columns).where(after).order_by(events.c.seq).limit(bindparam("limit")),
            list(events.columns),
            dialect,
        )
        self._audit = _Insert(AuditEvent.__table__, dialect)
        self._audits: _Batches | None = None

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
            configure=_raw_json,
        )
        try:
            await pool.open(wait=True, timeout=10)
        except Exception:  # the app still serves: reads take the thread path
            log.warning("async read pool did not open; job reads use threads", exc_info=True)
            await pool.close()
            return
        self._pool = pool
        self._audits = _Batches(functools.partial(self._insert_audits, pool), self._audit.most)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self._audits = None
        if pool is not None:
            await pool.close()

    async def job(self, tenant_id: str, job_id: str) -> Job | None:
        pool = self._pool
        if pool is None:
            return await to_thread.run_sync(self._job_in_thread, tenant_id, job_id)
        rows = await self._fetch(pool, self._job, {"job_id": job_id, "tenant_id": tenant_id})
        return detached(Job, self._job.values(rows[0])) if rows else None

    async def event_head(self, tenant_id: str, job_id: str) -> EventHead | None:
        """The tenant's job's status and newest event seq (what a stream polls), or None."""
        pool = self._pool
        if pool is None:
            return await to_thread.run_sync(self._head_in_thread, tenant_id, job_id)
        rows = await self._fetch(pool, self._head, {"job_id": job_id, "tenant_id": tenant_id})
        return EventHead(**self._head.values(rows[0])) if rows else None

    async def job_events(
        self, job_id: str, *, after: int, limit: int = EVENT_BATCH
    ) -> list[JobEvent]:
        """The job's events after seq ``after``, oldest first (the caller checked ownership)."""
        pool = self._pool
        if pool is None:
            return await to_thread.run_sync(self._events_in_thread, job_id, after, limit)
        params = {"job_id": job_id, "after": after, "limit": limit}
        rows = await self._fetch(pool, self._events, params)
        return [detached(JobEvent, self._events.values(row)) for row in rows]

    async def append_audit(self, row: Mapping[str, Any]) -> None:
        """Insert the audit event of these column values (every column of the table),
        committed before this returns.

        On PostgreSQL, the events that concurrent requests append while an insert is under
        way go together in the next ``INSERT``, each caller returning once its own row's
        statement committed (:class:`_Batches`): one round trip and commit for several
        downloads. Raises the database's errors (a transient one after one retry): the caller
        serves nothing it could not record."""
        audits = self._audits
        if audits is None:
            return await to_thread.run_sync(self._audit_in_thread, row)
        await audits.append(row)

    async def _insert_audits(self, pool: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        await self._fetch(pool, self._audit.sql(len(rows)), self._audit.params(rows), rows=False)

    async def _fetch(
        self, pool: Any, query: _Select | str, params: dict[str, Any], *, rows: bool = True
    ) -> list[Any]:
        try:
            return await self._fetch_once(pool, query, params, rows)
        except psycopg.OperationalError:
            # The server dropped connections (a restart, an idle timeout): the broken one
            # leaves the pool on return; check() drops the other dead idle ones, and the
            # retry waits for a fresh connection.
            await pool.check()
            return await self._fetch_once(pool, query, params, rows)

    async def _fetch_once(
        self, pool: Any, query: _Select | str, params: dict[str, Any], rows: bool
    ) -> list[Any]:
        sql = query if isinstance(query, str) else query.sql
        async with pool.connection() as conn:
            cursor = await conn.execute(sql, params, prepare=True)
            found: list[Any] = await cursor.fetchall() if rows else []
            return found

    def _audit_in_thread(self, row: Mapping[str, Any]) -> None:
        with self.db.session(write=True) as session:
            Repositories(session).stage(AuditEvent(**row))

    def _job_in_thread(self, tenant_id: str, job_id: str) -> Job | None:
        with self.db.read_one() as session:
            return Repositories(session).job(tenant_id, job_id)

    def _head_in_thread(self, tenant_id: str, job_id: str) -> EventHead | None:
        with self.db.read_one() as session:
            head = Repositories(session).event_head(tenant_id, job_id)
        return None if head is None else EventHead(*head)

    def _events_in_thread(self, job_id: str, after: int, limit: int) -> list[JobEvent]:
        with self.db.read_one() as session:
            return list(Repositories(session).job_events(job_id, after=after, limit=limit))


def _bind_processor(type_: Any, dialect: Any) -> Callable[[Any], Any] | None:
    """The column type's bind processing; JSON as psycopg's own wrapper (SQLAlchemy's
    psycopg dialect adapts JSON on its connections, which the pool's are not)."""
    impl = type_.dialect_impl(dialect)
    if isinstance(impl, JSON):
        return Jsonb if isinstance(impl, JSONB) else PgJson
    processor: Callable[[Any], Any] | None = type_.bind_processor(dialect)
    return processor


def _processor(type_: Any, dialect: Any) -> Callable[[Any], Any] | None:
    """The column type's result processing (e.g. UTC datetimes), as the ORM applies it.

    The pool's connections return JSON as its text (:func:`_raw_json`): a typed JSON column
    validates the text directly (:meth:`Typed.from_json`), others parse it first."""
    processor: Callable[[Any], Any] | None = type_.result_processor(dialect, None)
    if isinstance(type_, Typed):
        return type_.from_json
    if isinstance(type_.dialect_impl(dialect), JSON):
        after = processor
        return json.loads if after is None else lambda raw: after(json.loads(raw))
    return processor


def _unparsed(data: str | bytes) -> str | bytes:
    return data


async def _raw_json(conn: psycopg.AsyncConnection[Any]) -> None:
    """Have ``conn`` return json and jsonb values as their text, for :func:`_processor`."""
    set_json_loads(_unparsed, conn)
