"""The session-end log check finds what it is meant to find."""

from __future__ import annotations

from pathlib import Path

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
