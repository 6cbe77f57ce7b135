"""Mixed load against one real ``phivault serve`` (bench/load.py): device uploads, STOW-RS,
QIDO-RS, WADO-RS and exam lists from many concurrent clients, with no answer other than the
expected one or an intended 429. Only in ``make test-long``: set-up alone takes ~15 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "load.py"

pytestmark = pytest.mark.long


@pytest.mark.parametrize(
    ("clients", "seconds"),
    [pytest.param(20, 5, id="20-clients-5s"), pytest.param(200, 60, id="200-clients-60s")],
)
def test_concurrent_uploads_and_queries_get_no_errors(tmp_path: Path, clients: int, seconds: int) -> None:
    summary_file, log_file = tmp_path / "summary.json", tmp_path / "serve.log"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--clients",
            str(clients),
            "--seconds",
            str(seconds),
            "--json",
            str(summary_file),
            "--server-log",
            str(log_file),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert summary_file.exists(), f"the benchmark did not finish:\n{output}"
    summary = json.loads(summary_file.read_text())
    errors = {name: op["errors"] for name, op in summary["operations"].items() if op["errors"]}
    samples = {name: op["samples"][:2] for name, op in summary["operations"].items() if op["errors"]}
    assert errors == {}, f"errors other than 429 under load: {errors}\n{samples}\n{done.stdout[-3000:]}"
    assert done.returncode == 0, output
    # Every kind of request was exercised, not skipped by an early failure.
    assert all(op["requests"] > 0 for op in summary["operations"].values()), summary["operations"]
    assert summary["server_log_errors"] == [], summary["server_log_errors"]
