"""Pinned command-line tools for the test suite, each in a virtual environment of its own.

Security tools (sslyze, schemathesis, bandit, pip-audit) pin dependencies that conflict with
the project's own (DESIGN.md §10), so none of them goes into ``.venv``. Each gets
``.cache/venvs/<name>`` in the repository, made on first use from an exact requirement set
and reused after that. The requirement sets below are ``pip freeze`` of a clean install
(Python 3.11, manylinux x86_64): every package is pinned, so a new release of a dependency
cannot change a tool under the tests. Change a set, and the venv is remade on next use.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from servers.common import unavailable

SSLYZE = (
    "sslyze==6.3.1",
    "annotated-types==0.8.0",
    "cffi==2.1.1",
    "cryptography==46.0.7",
    "nassl==5.4.0",
    "pycparser==3.12",
    "pydantic==2.14.3",
    "pydantic-core==2.50.4",
    "tls-parser==2.0.2",
    "typing-extensions==4.16.0",
    "typing-inspection==0.4.5",
)
SCHEMATHESIS = (
    "schemathesis==4.32.5",
    "anyio==4.16.0",
    "certifi==2026.10.18",
    "charset-normalizer==3.5.2",
    "click==8.5.1",
    "graphql-core==3.3.2",
    "harfile==0.6.0",
    "hypothesis==6.170.15",
    "hypothesis-graphql==0.13.5",
    "idna==3.20",
    "iniconfig==2.3.1",
    "jsonschema-rs==0.60.3",
    "markdown-it-py==4.3.0",
    "markupsafe==3.0.4",
    "mdurl==0.1.2",
    "packaging==26.3",
    "pluggy==1.7.0",
    "pygments==2.21.0",
    "pyrate-limiter==4.5.1",
    "pytest==9.2.0",
    "pyyaml==6.0.3",
    "requests==2.34.2",
    "rich==15.0.0",
    "sortedcontainers==2.4.0",
    "typing-extensions==4.16.0",
    "urllib3==2.8.0",
    "werkzeug==3.1.9",
)
BANDIT = (
    "bandit==1.9.4",
    "markdown-it-py==4.3.0",
    "mdurl==0.1.2",
    "pygments==2.21.0",
    "pyyaml==6.0.3",
    "rich==15.0.0",
    "stevedore==5.10.0",
)
PIP_AUDIT = (
    "pip-audit==2.10.1",
    "boolean-py==5.0",
    "cachecontrol==0.14.4",
    "certifi==2026.10.18",
    "charset-normalizer==3.5.2",
    "cyclonedx-python-lib==11.12.0",
    "defusedxml==0.7.1",
    "filelock==4.2.11",
    "idna==3.20",
    "license-expression==30.4.4",
    "markdown-it-py==4.3.0",
    "mdurl==0.1.2",
    "msgpack==1.2.4",
    "packageurl-python==0.17.6",
    "packaging==26.3",
    "pip-api==0.0.35",
    "pip-requirements-parser==32.0.1",
    "platformdirs==4.14.7",
    "py-serializable==2.1.0",
    "pygments==2.21.0",
    "pyparsing==3.3.3",
    "requests==2.34.2",
    "rich==15.0.0",
    "sortedcontainers==2.4.0",
    "tomli==2.5.0",
    "tomli-w==1.2.0",
    "typing-extensions==4.16.0",
    "urllib3==2.8.0",
)

REPO_ROOT = Path(__file__).resolve().parents[2]
VENVS_DIR = REPO_ROOT / ".cache" / "venvs"
MARKER_NAME = "phivault-requirements.txt"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_INSTALL_TIMEOUT = 900.0


class ToolUnavailableError(Exception):
    """A tool's virtual environment could not be made."""


def ensure_tool_venv(name: str, requirements: Sequence[str]) -> Path:
    """Return the ``bin`` directory of the venv ``name`` holding exactly ``requirements``.

    Idempotent and cheap once installed (one marker file read). Safe when several processes
    call it at once (an exclusive lock per venv) and after an interrupted install: the marker,
    written last, names the requirement set and the interpreter the venv was made with; a
    venv without a matching marker is removed and made again.
    """
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"not a venv name: {name!r}")
    venv = VENVS_DIR / name
    bin_dir = venv / "bin"
    wanted = _marker_text(requirements)
    if _installed(venv, wanted):
        return bin_dir
    VENVS_DIR.mkdir(parents=True, exist_ok=True)
    with (VENVS_DIR / f"{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed(venv, wanted):  # another process finished the install while we waited
            return bin_dir
        shutil.rmtree(venv, ignore_errors=True)
        _run_install([sys.executable, "-m", "venv", str(venv)])
        _run_install(
            [
                str(bin_dir / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                *requirements,
            ]
        )
        (venv / MARKER_NAME).write_text(wanted)
    return bin_dir


def require_tool(name: str, requirements: Sequence[str]) -> Path:
    """``ensure_tool_venv``, or a skip (a failure in CI) naming why the tool is missing."""
    try:
        return ensure_tool_venv(name, requirements)
    except ToolUnavailableError as exc:
        unavailable(f"{name}: {exc}")
        raise  # unreachable: unavailable() skips or fails


def _marker_text(requirements: Sequence[str]) -> str:
    # The venv's python is a link to the interpreter that made it: a different one means remake.
    header = f"# python {sys.version.split()[0]} {Path(sys.base_prefix).resolve()}\n"
    return header + "".join(f"{requirement}\n" for requirement in requirements)


def _installed(venv: Path, wanted: str) -> bool:
    try:
        return (venv / MARKER_NAME).read_text() == wanted and (venv / "bin" / "python").exists()
    except OSError:
        return False


def _run_install(command: list[str]) -> None:
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=_INSTALL_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolUnavailableError(f"{' '.join(command[:5])} …: {exc}") from exc
    if result.returncode != 0:
        # pip's warnings about absent local indexes say nothing about the failure.
        lines = [
            line for line in (result.stderr or result.stdout).splitlines() if "WARNING: Location" not in line
        ]
        tail = "\n".join(line[:300] for line in lines[-15:])
        raise ToolUnavailableError(f"{' '.join(command[:5])} … failed:\n{tail}")
