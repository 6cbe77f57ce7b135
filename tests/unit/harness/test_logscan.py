"""The session-end log check finds what it is meant to find."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from servers import logscan


def test_planted_values_and_token_shapes_are_found(tmp_path: Path) -> None:
    logscan.plant("correct-horse-battery-staple")
    server_log = tmp_path / "serve.log"
    server_log.write_text("INFO ok\nWARNING login for DOE^JANE failed\n")
    logscan.register_log_file(server_log)
    token = "A" * 20 + "-_" + "b" * 21  # 43 URL-safe characters, like phivault's tokens
    leaks = logscan.scan(
        ["phivault.x: password correct-horse-battery-staple", f"phivault.y: token {token}", "fine"]
    )
    kinds = sorted((leak.where, leak.kind) for leak in leaks)
    assert ("serve.log", "planted value") in kinds
    assert ("test process log", "planted value") in kinds
    assert ("test process log", "token-shaped string") in kinds
    assert all("correct-horse-battery-staple" not in leak.excerpt for leak in leaks)
    server_log.write_text("")  # leave nothing for the real session-end check to report


def test_clean_lines_pass() -> None:
    assert (
        logscan.scan(["phivault.access: GET /healthz 200 1.0ms rid=3f1c2b9e-0d4e-4c1a-9b7e-2a5f6c7d8e9f"])
        == []
    )


class _Plugins:
    def get_plugin(self, name: str) -> None:
        del name


class _Config:
    pluginmanager = _Plugins()


class _Session:
    def __init__(self, config: object) -> None:
        self.config = config
        self.exitstatus: int = pytest.ExitCode.OK


def _suite_conftest(config: pytest.Config) -> Any:  # noqa: ANN401  # a module
    """tests/conftest.py as pytest loaded it (``import conftest`` may give another directory's)."""
    root = Path(__file__).resolve().parents[2] / "conftest.py"
    for plugin in config.pluginmanager.get_plugins():
        if Path(getattr(plugin, "__file__", "") or "/").resolve() == root:
            return plugin
    raise AssertionError("tests/conftest.py is not loaded")


def test_a_leak_found_by_an_xdist_worker_fails_the_whole_run(pytestconfig: pytest.Config) -> None:
    conftest = _suite_conftest(pytestconfig)

    worker_config = _Config()
    worker_config.workeroutput = {}  # type: ignore[attr-defined]  # what xdist gives a worker
    logscan.plant("hunter2-hunter2")
    logscan_lines = conftest._log_capture.lines
    logscan_lines.append("phivault.x: password hunter2-hunter2")
    try:
        worker = _Session(worker_config)
        conftest.pytest_sessionfinish(worker, 0)
        assert worker.exitstatus == pytest.ExitCode.OK  # a worker only reports
        found = worker_config.workeroutput["phivault_leaks"]  # type: ignore[attr-defined]
        assert any(kind == "planted value" for _, kind, _ in found)
    finally:
        logscan_lines.remove("phivault.x: password hunter2-hunter2")

    node = SimpleNamespace(workeroutput={"phivault_leaks": found})  # xdist's WorkerController
    controller = _Session(_Config())
    try:
        conftest.pytest_testnodedown(node, None)
        conftest.pytest_sessionfinish(controller, 0)
        assert controller.exitstatus == pytest.ExitCode.TESTS_FAILED
    finally:
        conftest._worker_leaks.clear()  # leave nothing for the real session-end check
