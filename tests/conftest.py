"""Fixtures shared by the whole suite.

Storage-touching tests take ``settings`` (or ``runtime``), which is parametrised over the
two supported databases: every such test runs on SQLite and on a real PostgreSQL 15.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phivault.clock import ManualClock
from phivault.config.settings import Settings, load_settings
from phivault.ids import new_id
from phivault.runtime import Runtime, build_runtime, initialise
from servers import logscan
from servers.common import unavailable
from servers.postgres import PostgresServer, PostgresUnavailable
from servers.s3 import MinistackUnavailableError, S3Server, start_s3_server

_log_capture = logscan.CapturingHandler()
logging.getLogger().addHandler(_log_capture)


_worker_leaks: list[logscan.Leak] = []  # on the xdist controller: what its workers found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any log of the whole session carries PHI, a secret or a token.

    Under pytest-xdist each worker scans the logs of its own tests and servers and hands
    what it found to the controller, which reports and fails the run: a worker's own exit
    status does not decide the run's.
    """
    del exitstatus
    leaks = logscan.scan(_log_capture.lines)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["phivault_leaks"] = [(leak.where, leak.kind, leak.excerpt) for leak in leaks]
        return
    leaks += _worker_leaks
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.section("PHI / secret leak check of all logs", sep="=", red=True, bold=True)
            for leak in leaks[:50]:
                reporter.line(f"{leak.where}: {leak.kind}: {leak.excerpt}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown when xdist is off (-p no:xdist)
def pytest_testnodedown(node: Any, error: object) -> None:  # noqa: ANN401  # xdist's WorkerController
    """xdist: collect the leaks a worker found (``pytest_sessionfinish`` above)."""
    del error
    found = getattr(node, "workeroutput", {}).get("phivault_leaks", [])
    _worker_leaks.extend(logscan.Leak(where, kind, excerpt) for where, kind, excerpt in found)


CRASH_SEED = "PHIVAULT_CRASH_SEED"  # the crash harness's replay seed: a test setting, not phivault's

# Tests never read the developer's own configuration.
for _name in [name for name in os.environ if name.startswith("PHIVAULT_") and name != CRASH_SEED]:
    del os.environ[_name]


def pytest_configure(config: pytest.Config) -> None:
    """Draw the crash harness's seed once, here (the xdist controller or a plain run): it is
    part of that test's id, and xdist workers, which inherit this environment, must collect
    the same ids.
    """
    if not hasattr(config, "workerinput"):
        os.environ.setdefault(CRASH_SEED, str(random.SystemRandom().randrange(1, 2**31)))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
        server.start()
    except PostgresUnavailable as exc:
        unavailable(f"PostgreSQL: {exc}")
        raise  # unreachable: unavailable() skips or fails
    yield server
    server.remove()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        server = start_s3_server(tmp_path_factory.mktemp("s3"))
    except MinistackUnavailableError as exc:
        unavailable(f"S3 server (ministack): {exc}")
        raise  # unreachable: unavailable() skips or fails
    with server:
        yield server


def _fresh_database_urls(backend: str, data_dir: Path, request: pytest.FixtureRequest) -> tuple[str, str]:
    if backend == "sqlite":
        return f"sqlite:///{data_dir / 'phivault.sqlite3'}", f"sqlite:///{data_dir / 'phi.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    suffix = new_id().replace("-", "")[:16]
    return server.create_database(f"main_{suffix}"), server.create_database(f"phi_{suffix}")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def settings(db_backend: str, data_dir: Path, request: pytest.FixtureRequest) -> Settings:
    main_url, phi_url = _fresh_database_urls(db_backend, data_dir, request)
    return load_settings(data_dir=data_dir, database_url=main_url, phi_database_url=phi_url)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def runtime(settings: Settings, clock: ManualClock) -> Iterator[Runtime]:
    built = build_runtime(settings, clock=clock)
    initialise(built)
    yield built
    built.close()
