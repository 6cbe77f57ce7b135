"""Kill -9 during a 500-instance STOW-RS ingest (issue 6, tests that must exist): after the
sweeper and a restart, every acknowledged instance is there and bit-identical to what its
receipt promised, nothing half-ingested is visible, and no PHI row is left without its exam.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess

from pydicom import uid as dicom_uid

from factories.accounts import AccountsFactory
from factories.crash import check_consistent, send_all
from factories.dicom_factory import make_instance, to_bytes
from phivault.accounts.permissions import Role
from phivault.audit.verify import verify_log
from phivault.config.settings import Settings
from phivault.runtime import build_runtime, initialise
from servers.phivault import PHIVAULT, PhivaultServer, phivault_env

INSTANCES = 500
KILL_AFTER = 120  # acknowledged instances before the kill


def _instances() -> list[bytes]:
    """500 small instances: 50 patients, one study and series each, 10 instances per series."""
    out = []
    for n in range(INSTANCES):
        patient, number = divmod(n, 10)
        root = f"1.2.826.0.1.3680043.10.1444.9.{patient + 1}"
        ds, _ = make_instance(
            study_uid=root,
            series_uid=f"{root}.1",
            sop_uid=f"{root}.1.{number + 1}",
            sop_class=dicom_uid.UltrasoundImageStorage,
            rows=32,
            columns=32,
        )
        ds.PatientID = f"MRN-CRASH-{patient:04d}"
        out.append(to_bytes(ds))
    return out


def test_kill_9_during_ingest_loses_nothing_acknowledged_and_leaves_nothing_half_done(
    settings: Settings,
) -> None:
    payloads = _instances()
    env = phivault_env(
        settings.data_dir,
        database_url=settings.database_url,
        phi_database_url=settings.phi_database_url,
        run_worker="false",
    )
    runtime = build_runtime(settings)
    initialise(runtime)
    accounts = AccountsFactory(runtime)
    institution = accounts.institution().id
    clinician = accounts.member(Role.CLINICIAN, institution)
    token, _ = accounts.session_for(clinician)
    runtime.close()

    server = PhivaultServer(settings.data_dir, env=env)
    server.start()
    acknowledged = send_all(server, token, payloads, stop_after=KILL_AFTER)
    assert server.process is not None
    server.process.wait(60)
    assert server.process.returncode == -signal.SIGKILL, "the server was killed mid-ingest"
    assert KILL_AFTER <= len(acknowledged) < INSTANCES

    # What an operator does after a crash, every server stopped: sweep at once.
    swept = subprocess.run(
        [PHIVAULT, "ingest", "sweep", "--grace-seconds", "0", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert swept.returncode == 0, swept.stderr
    runtime = build_runtime(settings)
    try:
        visible = check_consistent(runtime, acknowledged)
        assert visible >= len(acknowledged)
    finally:
        runtime.close()

    # Restarted, the sender re-sends what was not acknowledged, and some of what was (those
    # must come back as duplicates): each instance ends up stored exactly once.
    missing = [data for data in payloads if hashlib.sha256(data).hexdigest() not in acknowledged]
    again = [data for data in payloads if hashlib.sha256(data).hexdigest() in acknowledged][:50]
    server = PhivaultServer(settings.data_dir, env=env)
    server.start()
    try:
        resent = send_all(server, token, missing + again, stop_after=None)
    finally:
        assert server.terminate() == 0
    assert len(resent) == len(missing) + len(again)
    resent |= acknowledged
    runtime = build_runtime(settings)
    try:
        assert check_consistent(runtime, resent) == INSTANCES
        runtime.audit.integrate_pending(runtime.clock.now())
        assert verify_log(runtime.db).ok
    finally:
        runtime.close()
