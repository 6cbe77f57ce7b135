"""``phivault audit export`` as an operator runs it: the three formats on stdout or into a
file written atomically, filters, bad input as exit 2, and every export audited.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from phivault.audit.export import SD_ID, parse_jsonl_line
from servers.phivault import PHIVAULT, phivault_env
from servers.rsyslog import parse_syslog


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PHIVAULT, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    environment = phivault_env(tmp_path_factory.mktemp("export") / "data")
    assert run("init", env=environment).returncode == 0
    for _ in range(2):  # each verify writes an audit record
        assert run("audit", "verify", env=environment).returncode == 0
    return environment


def test_jsonl_to_stdout_is_current_without_a_worker_and_audits_each_export(env: dict[str, str]) -> None:
    first = run("audit", "export", "--format", "jsonl", env=env)
    assert first.returncode == 0, first.stderr
    records = [parse_jsonl_line(line) for line in first.stdout.splitlines()]
    assert [item.leaf_index for item in records] == list(range(len(records)))
    assert [item.fields.action for item in records].count("audit.verify") == 2
    second = run("audit", "export", "--action", "audit.export", env=env)
    exports = [parse_jsonl_line(line) for line in second.stdout.splitlines()]
    assert len(exports) >= 1
    assert {item.fields.actor_id for item in exports} == {"phivault-cli"}


def test_fhir_into_a_file_is_a_valid_bundle_and_leaves_no_temporary_file(
    env: dict[str, str], tmp_path: Path
) -> None:
    target = tmp_path / "audit.fhir.json"
    result = run("audit", "export", "--format", "fhir", "--output", str(target), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    bundle = Bundle.model_validate_json(target.read_bytes())
    assert bundle.type == "collection"
    assert bundle.entry
    assert all(type(entry.resource).__name__ == "AuditEvent" for entry in bundle.entry)
    assert [path.name for path in tmp_path.iterdir()] == [target.name]


def test_syslog_lines_filtered_by_platform_and_time(env: dict[str, str]) -> None:
    result = run("audit", "export", "--format", "syslog", "--platform", "--since", "2000-01-01", env=env)
    assert result.returncode == 0, result.stderr
    messages = [parse_syslog(line) for line in result.stdout.splitlines()]
    assert messages
    assert all("institution" not in message.structured_data[SD_ID] for message in messages)
    future = run("audit", "export", "--format", "syslog", "--since", "2999-01-01T00:00:00Z", env=env)
    assert future.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ("--since", "yesterday"),
        ("--format", "xml"),
        ("--institution", "i-1", "--platform"),
    ],
)
def test_bad_options_exit_2_without_exporting(env: dict[str, str], args: tuple[str, ...]) -> None:
    result = run("audit", "export", *args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""


def test_unwritable_output_is_one_error_line_and_exit_1(env: dict[str, str], tmp_path: Path) -> None:
    result = run("audit", "export", "--output", str(tmp_path / "missing-dir" / "x.jsonl"), env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("phivault: error: cannot write the export")
    assert result.stdout == ""
