"""``phivault device code|list|revoke`` as set-up scripts use them (no server needed)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from servers.logscan import plant
from servers.phivault import PHIVAULT, phivault_env


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PHIVAULT, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_codes_lists_and_refusals_from_the_command_line(tmp_path: Path) -> None:
    env = phivault_env(tmp_path / "data")
    institution = json.loads(run("institution", "create", "Script Clinic", "--json", env=env).stdout)["id"]
    made = run("device", "code", "--institution", institution, "--json", env=env)
    assert made.returncode == 0, made.stderr
    answer = json.loads(made.stdout)
    plant(answer["code"])
    assert set(answer) == {"code", "expires_at"}  # DESIGN.md §7
    assert re.fullmatch(r"([0-9A-Z]{5}-){4}[0-9A-Z]{5}", answer["code"])
    text = run("device", "code", "--institution", institution, "--serial", "SN-1", env=env)
    assert re.search(
        r"^server certificate pin \(phivault-agent activate --pin\): sha256//\S{44}$",
        text.stdout,
        re.MULTILINE,
    )
    assert json.loads(run("device", "list", "--json", env=env).stdout) == []

    unknown = run("device", "code", "--institution", "00000000-0000-4000-8000-000000000000", env=env)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines() == ["phivault: error: not_found: no such object"]
    bad_serial = run("device", "code", "--institution", institution, "--serial", "no spaces", env=env)
    assert bad_serial.returncode == 2
    assert "validation_error" in bad_serial.stderr
    missing = run("device", "revoke", "00000000-0000-4000-8000-000000000000", env=env)
    assert missing.returncode == 1
    assert len(missing.stderr.strip().splitlines()) == 1
