"""The one way to open a database: ``Database(url)``.

SQLite (the embedded default) runs in WAL mode with foreign keys on, a busy timeout and
``synchronous=FULL`` so an acknowledged commit survives a power cut. Every SQLite
transaction starts with ``BEGIN IMMEDIATE``: writers queue on the busy timeout instead of
failing with SQLITE_BUSY when a read transaction tries to become a write one. Work that
only reads says so (``Database.read``) and starts with a deferred ``BEGIN``: in WAL mode it
then neither waits for nor blocks the writer.
PostgreSQL is reached through psycopg 3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
_READ_ONLY = "phivault_read_only"
POSTGRES_CONNECT_TIMEOUT_S = 5


class Database:
    """An engine and its session factory for one database URL."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url: URL = normalise_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.engine: Engine = _make_engine(self.url, echo=echo)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session inside one transaction that only reads; rolled back at the end.

        On SQLite it does not take the write lock, so reads run beside a committing writer.
        Writing through it is a mistake (SQLite may then answer SQLITE_BUSY).
        """
        with self._sessions() as session:
            session.connection(execution_options={_READ_ONLY: True})
            try:
                yield session
            finally:
                session.rollback()

    def ping(self) -> None:
        """Run a trivial query; raises ``sqlalchemy.exc.OperationalError`` when unreachable."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()

    def safe_url(self) -> str:
        """The URL with the password hidden, for messages and logs."""
        return self.url.render_as_string(hide_password=True)


def normalise_url(url: str) -> URL:
    """Parse a database URL; plain ``postgresql://`` means psycopg 3."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.get_driver_name() in ("", "psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif backend not in ("sqlite", "postgresql"):
        msg = f"unsupported database {backend!r}: use sqlite:/// or postgresql://"
        raise ValueError(msg)
    return parsed


def _make_engine(url: URL, *, echo: bool) -> Engine:
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            msg = "an in-memory SQLite database loses data; give a file path"
            raise ValueError(msg)
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            # No cap on connections (a SQLite connection is an open file): a request holds one
            # of each database at once, and with the default cap (5 + 10) forty threads could
            # exhaust both pools, one holding the main write lock while waiting for a PHI
            # connection, until the pool timeout (bench/load.py). SQLite's own locks order the
            # writers; the number of threads (the server's thread pool) bounds the connections.
            max_overflow=-1,
        )
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
    return create_engine(
        url,
        echo=echo,
        pool_pre_ping=True,  # a restarted PostgreSQL leaves dead pooled connections
        pool_size=10,
        max_overflow=10,
        pool_timeout=10,
        connect_args=connect_args,
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:  # noqa: ANN401
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:  # noqa: ANN401
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
