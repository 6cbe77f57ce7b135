"""Alembic migrations for the main database and the PHI store, applied programmatically.

``phivault init`` and ``phivault serve`` call ``upgrade_all``. Replicas starting together
take a lock first (a PostgreSQL advisory lock, or a file lock beside a SQLite file), so
a migration runs once.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from phivault.db.engine import Database

Tree = Literal["main", "phi"]
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLES: dict[Tree, str] = {"main": "alembic_version", "phi": "phivault_phi_version"}
_ADVISORY_LOCK_IDS: dict[Tree, int] = {"main": 0x70686976, "phi": 0x70686970}


def _config(tree: Tree, connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR / tree))
    config.attributes["connection"] = connection
    config.attributes["version_table"] = VERSION_TABLES[tree]
    config.attributes["tree"] = tree
    return config


def head_revision(tree: Tree) -> str | None:
    return ScriptDirectory.from_config(_config(tree)).get_current_head()


def current_revision(db: Database, tree: Tree) -> str | None:
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLES[tree]})
        return context.get_current_revision()


def is_current(db: Database, tree: Tree) -> bool:
    return current_revision(db, tree) == head_revision(tree)


def upgrade(db: Database, tree: Tree) -> None:
    """Bring ``db`` to the newest revision of ``tree``."""
    with _migration_lock(db, tree), db.engine.connect() as connection:
        command.upgrade(_config(tree, connection), "head")
        connection.commit()


def upgrade_all(main: Database, phi: Database) -> None:
    upgrade(main, "main")
    upgrade(phi, "phi")


@contextlib.contextmanager
def _migration_lock(db: Database, tree: Tree) -> Iterator[None]:
    if db.is_sqlite:
        database = db.url.database or ""
        lock_path = Path(f"{database}.migrate.lock")
        lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    with db.engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _ADVISORY_LOCK_IDS[tree]})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _ADVISORY_LOCK_IDS[tree]})
            connection.commit()
