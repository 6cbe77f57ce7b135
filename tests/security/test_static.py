"""Static analysis of phivault's own code (bandit) and an audit of its locked dependencies
against published vulnerabilities (pip-audit). Each tool runs from its own pinned venv.
"""

from __future__ import annotations

import json
import re
import subprocess
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from servers.common import unavailable
from servers.tools import BANDIT, PIP_AUDIT, REPO_ROOT, require_tool

pytestmark = pytest.mark.security

SOURCE = REPO_ROOT / "src" / "phivault"
BANDIT_CONFIG = Path(__file__).with_name("bandit.yaml")
LOCK_FILE = REPO_ROOT / "requirements" / "dev.lock"
# pip-audit's sources, in order of preference; the first that can audit every locked
# package is used. Machines differ in what they reach (this one: pypi.org's project pages,
# but not its per-version JSON, and not api.osv.dev).
VULNERABILITY_SERVICES = ("pypi", "osv")
TOOL_TIMEOUT = 300
# A suppression names the bandit test(s) it silences and says why: `# nosec B101  # reason`.
NOSEC_WITH_REASON = re.compile(r"#\s*nosec\s+B\d{3}(\s*,\s*B\d{3})*\s+#\s*\S")


@dataclass(frozen=True, slots=True)
class KnownVulnerability:
    package: str
    version: str
    id: str
    aliases: tuple[str, ...]
    fix_versions: tuple[str, ...]

    def __str__(self) -> str:
        aliases = f" ({', '.join(self.aliases)})" if self.aliases else ""
        fixed = ", ".join(self.fix_versions) or "no fixed release"
        return f"{self.package}=={self.version}: {self.id}{aliases}; fixed in {fixed}"


@dataclass(frozen=True, slots=True)
class Audit:
    service: str
    vulnerabilities: list[KnownVulnerability]
    unaudited: list[str]  # "name: reason" for each package the service could not answer for
    error: str | None  # pip-audit could not run the audit at all


def test_bandit_finds_no_issue_in_phivault(tmp_path: Path) -> None:
    bandit = require_tool("bandit", BANDIT) / "bandit"
    report = tmp_path / "bandit.json"
    completed = subprocess.run(
        [str(bandit), "-r", str(SOURCE), "-c", str(BANDIT_CONFIG), "-f", "json", "-o", str(report), "-q"],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    # Exit 1 means "issues found"; the report says which.
    assert completed.returncode in (0, 1), (
        f"bandit exited {completed.returncode}:\n{completed.stderr[-3000:]}"
    )
    result: dict[str, Any] = json.loads(report.read_text())
    # A file bandit cannot parse is a file it did not check.
    assert result["errors"] == [], result["errors"]
    issues = [
        f"{Path(issue['filename']).relative_to(REPO_ROOT)}:{issue['line_number']}: {issue['test_id']} "
        f"({issue['issue_severity']}/{issue['issue_confidence']}) {issue['issue_text']}\n"
        f"    {_flagged_line(issue)}"
        for issue in result["results"]
    ]
    assert not issues, (
        f"bandit: {len(issues)} issue(s) in src/phivault. Fix them, or suppress one that is not "
        "a defect on its line with `# nosec BXXX  # reason`:\n" + "\n".join(issues)
    )


def _flagged_line(issue: dict[str, Any]) -> str:
    # bandit's "code" is a few numbered lines around the finding.
    prefix = f"{issue['line_number']} "
    return next(
        (line[len(prefix) :].strip() for line in issue["code"].splitlines() if line.startswith(prefix)), ""
    )


def test_every_bandit_suppression_names_its_test_and_reason() -> None:
    unexplained = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {comment}"
        for path in sorted(SOURCE.rglob("*.py"))
        for line, comment in _comments(path)
        if re.search(r"#\s*nosec\b", comment, re.IGNORECASE) and not NOSEC_WITH_REASON.search(comment)
    ]
    assert not unexplained, "write `# nosec BXXX  # reason`:\n" + "\n".join(unexplained)


@pytest.mark.network  # PyPI's per-version advisory API and OSV are not reachable everywhere
def test_locked_dependencies_have_no_known_vulnerabilities(tmp_path: Path) -> None:
    pip_audit = require_tool("pip-audit", PIP_AUDIT) / "pip-audit"
    incomplete: list[str] = []
    for service in VULNERABILITY_SERVICES:
        audit = _pip_audit(pip_audit, service, tmp_path / service)
        # A vulnerability one service knows of is real even if that service missed other packages.
        assert not audit.vulnerabilities, (
            f"pip-audit ({service}): known vulnerabilities in {LOCK_FILE.relative_to(REPO_ROOT)}:\n"
            + "\n".join(f"- {vulnerability}" for vulnerability in audit.vulnerabilities)
        )
        if audit.error is None and not audit.unaudited:
            return
        shown = audit.error or f"{len(audit.unaudited)} package(s) not audited, e.g. {audit.unaudited[0]}"
        incomplete.append(f"{service}: {shown}")
    # pip-audit itself exits 0 when it could audit nothing; an audit that did not happen must
    # not read as a pass.
    unavailable("no vulnerability service could audit the lock file: " + " | ".join(incomplete))


def _pip_audit(pip_audit: Path, service: str, workdir: Path) -> Audit:
    workdir.mkdir(parents=True)
    report = workdir / "pip-audit.json"
    command = [
        str(pip_audit),
        f"--requirement={LOCK_FILE}",
        "--no-deps",  # the lock file already lists every package, pinned
        "--disable-pip",
        f"--vulnerability-service={service}",
        "--format=json",
        f"--output={report}",
        "--aliases=on",
        "--desc=off",
        "--progress-spinner=off",
        f"--cache-dir={workdir / 'cache'}",  # answers from today, not from an old HTTP cache
    ]
    try:
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return Audit(service, [], [], f"no answer in {TOOL_TIMEOUT} s")
    try:
        result: dict[str, Any] = json.loads(report.read_text())
    except (OSError, ValueError):
        # No report: pip-audit stopped before auditing (e.g. the service did not resolve).
        last = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Audit(service, [], [], f"exit {completed.returncode}: {last[:400]}")
    return _parse_audit(service, result)


def _parse_audit(service: str, result: dict[str, Any]) -> Audit:
    vulnerabilities: list[KnownVulnerability] = []
    unaudited: list[str] = []
    for dependency in result["dependencies"]:
        if "skip_reason" in dependency:
            unaudited.append(f"{dependency['name']}: {dependency['skip_reason']}")
            continue
        vulnerabilities.extend(
            KnownVulnerability(
                package=dependency["name"],
                version=dependency["version"],
                id=vulnerability["id"],
                aliases=tuple(vulnerability.get("aliases", ())),
                fix_versions=tuple(vulnerability.get("fix_versions", ())),
            )
            for vulnerability in dependency.get("vulns", ())
        )
    return Audit(service, vulnerabilities, unaudited, None)


def test_audit_report_parsing_separates_vulnerable_from_unaudited_packages() -> None:
    # The shape pip-audit 2.10 writes with --format=json; a vulnerable package, a clean one,
    # and one the service could not answer for.
    audit = _parse_audit(
        "pypi",
        {
            "dependencies": [
                {
                    "name": "jinja2",
                    "version": "3.1.2",
                    "vulns": [
                        {
                            "id": "GHSA-h5c8-rqwp-cp95",
                            "fix_versions": ["3.1.3"],
                            "aliases": ["CVE-2024-22195"],
                        }
                    ],
                },
                {"name": "idna", "version": "3.20", "vulns": []},
                {"name": "alembic", "skip_reason": "Dependency not found on PyPI and could not be audited"},
            ],
            "fixes": [],
        },
    )
    assert [str(vulnerability) for vulnerability in audit.vulnerabilities] == [
        "jinja2==3.1.2: GHSA-h5c8-rqwp-cp95 (CVE-2024-22195); fixed in 3.1.3"
    ]
    assert audit.unaudited == ["alembic: Dependency not found on PyPI and could not be audited"]


def _comments(path: Path) -> list[tuple[int, str]]:
    with tokenize.open(path) as source:
        return [
            (token.start[0], token.string)
            for token in tokenize.generate_tokens(source.readline)
            if token.type == tokenize.COMMENT
        ]
