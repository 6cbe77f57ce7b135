"""Kill -9 during a burst of audited writes and during sequencing: after restart the log
verifies and every change that committed has its event (issue 4, faults).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from phivault.audit.models import AuditRecord
from phivault.audit.verify import verify_log
from phivault.config.settings import Settings
from phivault.db.models import Job
from phivault.runtime import build_runtime, initialise

# A writer process: each transaction makes a change (a job row) and its audit record, and
# prints the change's id only after the commit returned, so a printed id was acknowledged.
WRITER = """
import sys
from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.service import Actor, SystemSubject, Target, record
from phivault.config.settings import load_settings
from phivault.db.jobs import enqueue
from phivault.runtime import build_runtime
runtime = build_runtime(load_settings())
subject = SystemSubject(Actor(ActorType.USER, "crash-writer"), "inst-1")
while True:
    with runtime.db.transaction() as session:
        job_id = enqueue(session, "test.change", {}, now=runtime.clock.now())
        now = runtime.clock.now()
        record(session, AuditAction.KEY_ROTATE, subject, Target("job", job_id), Outcome.SUCCESS, now=now)
    print(job_id, flush=True)
"""

SEQUENCER = """
from phivault.config.settings import load_settings
from phivault.runtime import build_runtime
runtime = build_runtime(load_settings())
"""
PROGRESS = """
while True:
    print(runtime.audit.integrate_pending(runtime.clock.now(), limit=50), flush=True)
"""


def _env(settings: Settings) -> dict[str, str]:
    return {
        **{name: value for name, value in os.environ.items() if not name.startswith("PHIVAULT_")},
        "PHIVAULT_DATA_DIR": str(settings.data_dir),
        "PHIVAULT_DATABASE_URL": settings.database_url,
        "PHIVAULT_PHI_DATABASE_URL": settings.phi_database_url,
        "PHIVAULT_AUDIT_CHECKPOINT_RECORDS": "25",
    }


def _run_then_kill(code: str, env: dict[str, str], after: float, out: Path) -> None:
    """Start ``code``, wait until it has done some work, then SIGKILL it ``after`` s later."""
    errors = out.with_suffix(".err")
    with out.open("ab") as sink, errors.open("ab") as error_sink:
        process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=sink, stderr=error_sink)
        started = out.stat().st_size
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and out.stat().st_size == started and process.poll() is None:
            time.sleep(0.05)  # waiting for the first acknowledged write
        time.sleep(after)  # the kill then lands at an arbitrary point of the work
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    assert process.returncode == -signal.SIGKILL, errors.read_text()[-2000:]


def test_kill_9_during_writes_and_sequencing_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    runtime = build_runtime(settings)
    initialise(runtime)
    env = _env(settings)
    acknowledged = tmp_path / "acknowledged.txt"
    rng = random.Random(20261122)  # reproducible kill moments, not a secret
    for _ in range(3):
        _run_then_kill(WRITER, env, rng.uniform(0.3, 1.5), acknowledged)
        _run_then_kill(SEQUENCER + PROGRESS, env, rng.uniform(0.1, 0.8), tmp_path / "sequencer.txt")
    try:
        while runtime.audit.integrate_pending(runtime.clock.now()):
            pass
        runtime.audit.checkpoint_now(runtime.clock.now())
        report = verify_log(runtime.db)
        assert report.ok, report.problems
        assert report.pending_records == 0

        # An id can be printed only after its commit; a killed print may be cut short.
        acked = {line for line in acknowledged.read_text().splitlines() if len(line) == 36}
        assert len(acked) > 10
        with runtime.db.transaction() as session:
            changes = set(session.scalars(select(Job.id).where(Job.kind == "test.change")))
            events = set(
                session.scalars(select(AuditRecord.object_id).where(AuditRecord.object_type == "job"))
            )
        assert acked <= changes, "an acknowledged change was lost"
        assert changes == events, "a change without its event, or an event without its change"
    finally:
        runtime.close()
