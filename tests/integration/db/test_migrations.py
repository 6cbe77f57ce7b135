from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from phivault.config.settings import Settings
from phivault.db.engine import Database
from phivault.db.migrate import current_revision, head_revision, is_current, upgrade_all
from phivault.db.models import Job
from phivault.runtime import Runtime


def test_both_databases_are_at_head_after_initialise(runtime: Runtime) -> None:
    assert is_current(runtime.db, "main")
    assert is_current(runtime.phi_db, "phi")
    assert "jobs" in inspect(runtime.db.engine).get_table_names()
    # the PHI store is a separate database: none of the main tables live there
    assert "jobs" not in inspect(runtime.phi_db.engine).get_table_names()


def test_upgrading_again_changes_nothing(runtime: Runtime) -> None:
    before = current_revision(runtime.db, "main")
    upgrade_all(runtime.db, runtime.phi_db)
    assert current_revision(runtime.db, "main") == before == head_revision("main")


def test_two_replicas_initialising_at_once_both_succeed(settings: Settings) -> None:
    env = {
        **os.environ,
        "PHIVAULT_DATA_DIR": str(settings.data_dir),
        "PHIVAULT_DATABASE_URL": settings.database_url,
        "PHIVAULT_PHI_DATABASE_URL": settings.phi_database_url,
    }
    phivault = str(Path(sys.executable).with_name("phivault"))
    replicas = [
        subprocess.Popen([phivault, "init"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outcomes = [(replica.communicate(timeout=60)[1], replica.returncode) for replica in replicas]
    assert [code for _, code in outcomes] == [0, 0], outcomes
    main = Database(settings.database_url)
    try:
        assert is_current(main, "main")
    finally:
        main.dispose()


def test_timestamps_come_back_timezone_aware_in_utc(runtime: Runtime) -> None:
    moment = datetime(2026, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    with runtime.db.transaction() as session:
        session.add(
            Job(
                id="j1",
                kind="k",
                payload={},
                status="queued",
                attempts=0,
                max_attempts=1,
                run_at=moment,
                created_at=moment,
            )
        )
    with runtime.db.transaction() as session:
        job = session.get(Job, "j1")
        assert job is not None
        assert job.run_at == moment
        assert job.run_at.tzinfo is not None
        assert job.run_at.utcoffset() == timedelta(0)


def test_naive_timestamps_are_refused(runtime: Runtime) -> None:
    with pytest.raises(Exception, match="naive"), runtime.db.transaction() as session:
        session.add(
            Job(id="j2", kind="k", payload={}, status="queued", attempts=0, max_attempts=1,
                run_at=datetime(2026, 1, 1), created_at=datetime(2026, 1, 1, tzinfo=UTC))  # noqa: DTZ001
        )  # fmt: skip


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
def test_sqlite_runs_in_wal_mode_with_foreign_keys(runtime: Runtime) -> None:
    with runtime.db.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_reads_run_beside_a_writer_and_keep_nothing(runtime: Runtime) -> None:
    """``Database.read`` does not wait for a transaction holding the write lock (on SQLite
    a deferred BEGIN: with BEGIN IMMEDIATE this would hang for the busy timeout, then fail),
    and nothing done through it is kept.
    """
    count = text("SELECT count(*) FROM jobs")
    with runtime.db.read() as reader:
        before = reader.execute(count).scalar()
    insert = text(
        "INSERT INTO jobs (id, kind, payload, status, attempts, max_attempts, run_at, created_at)"
        " VALUES ('x', 'k', '{}', 'queued', 0, 1, '2026-01-01', '2026-01-01')"
    )
    with runtime.db.transaction() as writer:
        writer.execute(text("UPDATE jobs SET attempts = attempts WHERE 1 = 0"))  # takes the lock
        with runtime.db.read() as reader:
            assert reader.execute(count).scalar() == before
    with runtime.db.read() as reader:
        reader.execute(insert)
    with runtime.db.read() as reader:
        assert reader.execute(count).scalar() == before
