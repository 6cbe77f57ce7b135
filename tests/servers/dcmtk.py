"""DCMTK's command-line DICOM peers (Debian ``dcmtk``): ``storescu`` as a modality.

Debian's DCMTK leaves Nagle's algorithm on unless ``TCP_NODELAY=1`` is in the environment
(DESIGN.md §10), so every run sets it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from servers.common import unavailable


@dataclass(frozen=True)
class StoreResult:
    returncode: int
    output: str


def storescu_binary() -> str:
    """The path of ``storescu``, or a skip (a failure in CI) naming the missing package."""
    found = shutil.which("storescu")
    if found is None:
        unavailable("dcmtk's storescu is not installed (Debian package dcmtk; scripts/install-test-deps.sh)")
        raise AssertionError  # unreachable: unavailable() skips or fails
    return found


def storescu(  # storescu's options, named at each call site
    port: int,
    files: list[Path],
    *,
    calling: str,
    called: str = "PHIVAULT",
    host: str = "127.0.0.1",
    extra: tuple[str, ...] = (),
    timeout: float = 120,
) -> StoreResult:
    """Send ``files`` with one association; ``output`` is storescu's verbose log."""
    command = [storescu_binary(), "-v", "-aet", calling, "-aec", called, *extra, host, str(port)]
    command += [str(path) for path in files]
    env = {**os.environ, "TCP_NODELAY": "1"}
    result = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return StoreResult(result.returncode, result.stdout + result.stderr)
