"""Engines and sessions. SQLite runs in WAL mode; writers take the lock up front."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["UNAVAILABLE", "Database"]

# What a database that is down, restarting, overloaded or locked raises: the request may
# succeed if retried later (the API answers 503 with Retry-After). SQLAlchemy wraps the
# driver's errors; the API's asynchronous job reads (ppml.db.reads) raise psycopg's own,
# and a pool that found no free connection in time raises TimeoutError or PoolTimeout
# (a psycopg.OperationalError).
UNAVAILABLE: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.TimeoutError,
    psycopg.OperationalError,
)


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN and ignores FOR UPDATE; take it over
    # (the SQLAlchemy "serializable isolation / savepoints" recipe) so a writer can BEGIN
    # IMMEDIATE and hold the database's write lock from its first statement.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """An engine with two session factories: readers, and writers that lock first."""

    def __init__(self, url: str, *, echo: bool = False, pool_size: int = 40) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            # The API runs database work on anyio's 40 worker threads: a pool as large keeps
            # every connection open under load (an overflow connection is opened and closed
            # per checkout, a new PostgreSQL backend each time).
            kwargs.update(pool_size=pool_size, max_overflow=10)
        self.engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        # Every session starts with these entries in its ``info``: what the core's units of
        # work need besides the database (the ledger's head file, ``ppml.privacy.heads``).
        self.info: dict[str, Any] = {}
        self._reader = sessionmaker(self.engine, expire_on_commit=False, info=self.info)
        writer_bind = self.engine.execution_options(sqlite_immediate=True)
        self._writer = sessionmaker(writer_bind, expire_on_commit=False, info=self.info)
        # PostgreSQL runs a lone statement in its own snapshot anyway (READ COMMITTED), so a
        # one-query read needs no BEGIN and COMMIT, two round trips saved on every poll.
        # SQLite keeps its read transaction (one WAL snapshot; its BEGIN costs no round trip).
        self._single = self._reader
        if not self.is_sqlite:
            single_bind = self.engine.execution_options(isolation_level="AUTOCOMMIT")
            self._single = sessionmaker(single_bind, expire_on_commit=False, info=self.info)

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on any exception.

        ``write=True`` on SQLite starts with ``BEGIN IMMEDIATE`` (the database's write lock);
        on PostgreSQL, repositories lock the rows they need with ``FOR UPDATE``.
        """
        factory = self._writer if write else self._reader
        with factory() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def read_one(self) -> Iterator[Session]:
        """A session for a read of ONE statement (a lookup by key), never for writes.

        On PostgreSQL it runs in autocommit mode: the statement is its own transaction.
        """
        with self._single() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
