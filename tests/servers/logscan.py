"""The suite-wide log check (issue 9): no PHI-looking value, token or secret in any log.

Everything logged in the test process is captured by ``CapturingHandler``; every
``phivault`` process a test starts writes its output to a file registered here. At the
end of the session all of it is scanned for

* the synthetic PHI values tests plant (``PLANTED_PHI``, plus anything a test registers
  with ``plant``),
* secrets tests created (passwords, tokens, keys registered with ``plant``),
* token-shaped strings: phivault's opaque tokens are 43 URL-safe base64 characters.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

# Made-up patients used across the suite; never real people.
PLANTED_PHI: frozenset[str] = frozenset({"DOE^JANE", "Jane Doe", "SYNTH-PATIENT-0001", "1970-01-01"})

_TOKEN_SHAPE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")
_MAX_CAPTURED = 200_000

_planted: set[str] = set(PLANTED_PHI)
_log_files: list[Path] = []
_lock = threading.Lock()


def plant(*values: str) -> None:
    """Register values (a password, a token, a PHI string) that must never reach a log."""
    with _lock:
        _planted.update(value for value in values if len(value) >= 6)  # shorter is noise


def register_log_file(path: Path) -> None:
    with _lock:
        _log_files.append(path)


class CapturingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < _MAX_CAPTURED:
            try:
                self.lines.append(f"{record.name}: {record.getMessage()}")
            except Exception:  # noqa: BLE001  # a broken log call must not break the test
                self.lines.append(f"{record.name}: <unformattable {record.msg!r}>")


@dataclass(frozen=True)
class Leak:
    where: str
    kind: str
    excerpt: str


def scan(lines: list[str]) -> list[Leak]:
    with _lock:
        planted = sorted(_planted)
        files = list(_log_files)
    sources: list[tuple[str, str]] = [("test process log", line) for line in lines]
    for path in files:
        if path.exists():
            sources.extend((path.name, line) for line in path.read_text(errors="replace").splitlines())
    leaks: list[Leak] = []
    for where, line in sources:
        leaks.extend(Leak(where, "planted value", _redact(line, value)) for value in planted if value in line)
        match = _TOKEN_SHAPE.search(line)
        if match:
            leaks.append(Leak(where, "token-shaped string", _redact(line, match.group())))
    return leaks


def _redact(line: str, value: str) -> str:
    # The report must not itself print the secret in full.
    return line.replace(value, value[:3] + "…")[:300]
