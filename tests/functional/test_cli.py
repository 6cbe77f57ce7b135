"""The ``phivault`` command as scripts and operators use it: exit codes and messages."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers.common import free_port
from servers.phivault import PHIVAULT, phivault_env

AGENT = str(Path(sys.executable).with_name("phivault-agent"))


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PHIVAULT, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = run("--help", env=phivault_env(tmp_path / "data"))
    assert result.returncode == 0
    for command in ("serve", "init", "doctor", "worker"):
        assert command in result.stdout


def test_agent_command_is_installed() -> None:
    result = subprocess.run([AGENT, "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.startswith("phivault-agent ")


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("port", "eighty"),
        ("profile", "staging"),
        ("database_url", "mysql://db.example/phivault"),
        ("object_store_url", "ftp://files.example/objects"),
        ("admin_allow_cidrs", "everyone"),
    ],
)
def test_invalid_setting_is_one_line_naming_it_and_exit_2(tmp_path: Path, setting: str, value: str) -> None:
    env = phivault_env(tmp_path / "data", **{setting: value})
    result = run("doctor", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"PHIVAULT_{setting.upper()}" in lines[0]
    assert not (tmp_path / "data").exists()


def test_unreadable_config_file_is_exit_2(tmp_path: Path) -> None:
    env = phivault_env(tmp_path / "data")
    env["PHIVAULT_CONFIG"] = str(tmp_path / "missing.toml")
    result = run("init", env=env)
    assert result.returncode == 2
    assert "PHIVAULT_CONFIG" in result.stderr


def test_doctor_fails_before_init_and_passes_after(tmp_path: Path) -> None:
    env = phivault_env(tmp_path / "data")
    before = run("doctor", "--json", env=env)
    assert before.returncode == 1
    assert json.loads(before.stdout)["ok"] is False
    init = run("init", "--json", env=env)
    assert init.returncode == 0, init.stderr
    assert json.loads(init.stdout)["data_dir"] == str(tmp_path / "data")
    after = run("doctor", "--json", env=env)
    report = json.loads(after.stdout)
    assert after.returncode == 0, report
    assert report["ok"] is True
    assert {finding["status"] for finding in report["findings"]} == {"pass"}


def test_prod_serve_refuses_to_start_naming_failed_guardrails(tmp_path: Path) -> None:
    port = free_port()
    env = phivault_env(tmp_path / "data", profile="prod", port=str(port))
    result = run("serve", env=env)
    assert result.returncode == 1
    assert "refusing to start in prod" in result.stderr
    assert "tls_certificate" in result.stderr
    assert "keyring_master_key" in result.stderr


def test_dev_serve_on_a_busy_port_exits_with_an_error(tmp_path: Path) -> None:
    import socket  # noqa: PLC0415

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", "--port", str(port), env=phivault_env(tmp_path / "data"), timeout=60)
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower()


def test_audit_verify_passes_then_finds_tampering(tmp_path: Path) -> None:
    import sqlite3  # noqa: PLC0415

    env = phivault_env(tmp_path / "data", audit_checkpoint_seconds="1")
    assert run("init", env=env).returncode == 0
    for _ in range(3):  # each verify is itself audited: three records
        run("audit", "verify", env=env)
    # a worker integrates the records and signs a checkpoint
    worker = subprocess.Popen(
        [PHIVAULT, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        report: dict[str, object] = {}
        while time.monotonic() < deadline:
            clean = run("audit", "verify", "--json", env=env)
            report = json.loads(clean.stdout)
            if clean.returncode == 0 and int(str(report["checkpoints_checked"])) >= 1:
                break
            time.sleep(0.5)
    finally:
        worker.terminate()
        worker.wait(30)
    assert report["ok"] is True, report
    assert int(str(report["tree_size"])) >= 3

    database = sqlite3.connect(tmp_path / "data" / "phivault.sqlite3")
    with database:
        database.execute("DROP TRIGGER audit_records_no_update")
        database.execute("UPDATE audit_records SET outcome = 'failure' WHERE seq = 1")
    database.close()
    tampered = run("audit", "verify", "--json", env=env)
    assert tampered.returncode == 1
    assert json.loads(tampered.stdout)["first_bad_index"] == 0


def test_serve_refuses_a_master_key_that_does_not_open_the_keyring(tmp_path: Path) -> None:
    env = phivault_env(tmp_path / "data", port=str(free_port()))
    assert run("init", env=env).returncode == 0
    assert run("doctor", env=env).returncode == 0  # the keyring exists, sealed by this key
    key = tmp_path / "data" / "master.key"
    key.unlink()
    key.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    key.chmod(0o600)
    result = run("serve", env=env)
    assert result.returncode == 1
    assert "keyring cannot be used" in result.stderr


def test_audit_prune_refuses_the_retention_lock(tmp_path: Path) -> None:
    env = phivault_env(tmp_path / "data")
    assert run("init", env=env).returncode == 0
    refused = run("audit", "prune", "--before", "2026-11-01", env=env)
    assert refused.returncode == 1
    assert "retention lock" in refused.stderr
    allowed = run("audit", "prune", "--before", "2020-01-01", "--json", env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["deleted"] == 0
