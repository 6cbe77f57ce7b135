"""Crash consistency under mixed load (issue 9, item 4).

``phivault serve`` is killed with SIGKILL at a random moment while clients ingest over
STOW-RS and an admin reads and changes audited settings; then the sweeper runs, the server
restarts, and the invariants are checked:

* every acknowledged instance is readable and bit-identical to its receipt's digest;
* nothing unacknowledged is half-visible (index rows, object and PHI rows all or nothing;
  study counters match their rows);
* no orphan object or PHI row after the sweeper; no PHI row without its exam;
* ``audit verify`` passes, and every acknowledged policy change has its audit event.

``make test`` runs 3 rounds per database; ``make test-long`` 20.
The seed of the random kill moments is the test's parameter (in its id), so a failing run
can be replayed with ``PHIVAULT_CRASH_SEED``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time

import pytest
from sqlalchemy import select

from factories.accounts import AccountsFactory, Member
from factories.crash import check_consistent, send_all
from factories.dicom_factory import make_instance, to_bytes
from phivault.accounts.permissions import Role
from phivault.audit.actions import AuditAction
from phivault.audit.models import AuditRecord
from phivault.audit.verify import verify_log
from phivault.config.settings import Settings
from phivault.runtime import Runtime, build_runtime, initialise
from servers.phivault import PHIVAULT, PhivaultServer, phivault_env

ROUNDS = 3
LONG_ROUNDS = 20
SEED = int(os.environ.get("PHIVAULT_CRASH_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
PER_ROUND = 60  # instances offered per round; the kill comes first, usually


def _payloads(round_number: int) -> list[bytes]:
    out = []
    for n in range(PER_ROUND):
        patient, number = divmod(n, 6)
        root = f"1.2.826.0.1.3680043.10.1444.77.{round_number + 1}.{patient + 1}"
        ds, _ = make_instance(
            study_uid=root, series_uid=f"{root}.1", sop_uid=f"{root}.1.{number + 1}", rows=32, columns=32
        )
        ds.PatientID = f"MRN-HARNESS-{round_number}-{patient}"
        out.append(to_bytes(ds))
    return out


def _token(runtime: Runtime, member: Member) -> str:
    token, _ = AccountsFactory(runtime).session_for(member, mfa=member.role is Role.INSTITUTION_ADMIN)
    return token


class _AdminLoad:
    """An institution admin: audited reads, and policy changes whose acknowledgement is
    recorded (an acknowledged change must have its audit event after the crash).
    """

    def __init__(self, server: PhivaultServer, token: str) -> None:
        self.server = server
        self.headers = {"Authorization": f"Bearer {token}"}
        self.acknowledged_changes = 0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        import httpx  # noqa: PLC0415

        with self.server.client() as http:
            flip = False
            while True:
                try:
                    http.get("/api/v1/quarantine", headers=self.headers)
                    flip = not flip
                    answer = http.put(
                        "/api/v1/ingest/policy",
                        json={"clean_descriptors": flip, "pixel_rules": [], "private_allow_list": []},
                        headers=self.headers,
                    )
                except httpx.TransportError:
                    return
                if answer.status_code == 200:
                    self.acknowledged_changes += 1


@pytest.mark.parametrize("seed", [SEED])
def test_random_kills_under_mixed_load_keep_every_invariant(settings: Settings, seed: int) -> None:
    _harness(settings, seed, ROUNDS)


@pytest.mark.long
@pytest.mark.parametrize("seed", [SEED])
def test_twenty_random_kills_under_mixed_load(settings: Settings, seed: int) -> None:
    _harness(settings, seed, LONG_ROUNDS)


def _harness(settings: Settings, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
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
    admin = accounts.member(Role.INSTITUTION_ADMIN, institution, mfa=True)
    runtime.close()
    acknowledged: set[str] = set()
    changes = 0
    for round_number in range(rounds):
        runtime = build_runtime(settings)
        clinician_token, admin_token = _token(runtime, clinician), _token(runtime, admin)
        runtime.close()
        server = PhivaultServer(settings.data_dir, env=env)
        server.start()
        admin_load = _AdminLoad(server, admin_token)
        admin_load.thread.start()
        delay = rng.uniform(0.5, 4.0)

        def kill_later(server: PhivaultServer = server, delay: float = delay) -> None:
            time.sleep(delay)
            assert server.process is not None
            server.process.send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_later)
        killer.start()
        acknowledged |= send_all(server, clinician_token, _payloads(round_number), stop_after=None, clients=3)
        killer.join()
        admin_load.thread.join(timeout=120)
        assert server.process is not None
        server.process.wait(60)
        changes += admin_load.acknowledged_changes

        swept = subprocess.run(
            [PHIVAULT, "ingest", "sweep", "--grace-seconds", "0", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert swept.returncode == 0, f"round {round_number}: {swept.stderr}"
        runtime = build_runtime(settings)
        try:
            check_consistent(runtime, acknowledged)
            runtime.audit.integrate_pending(runtime.clock.now())
            report = verify_log(runtime.db)
            assert report.ok, f"round {round_number}: audit verify failed"
            with runtime.db.transaction() as session:
                recorded = session.scalars(
                    select(AuditRecord.id).where(AuditRecord.action == AuditAction.INGEST_POLICY_UPDATE.value)
                ).all()
            assert len(recorded) >= changes, f"round {round_number}: an acknowledged change lost its event"
        finally:
            runtime.close()
    # The server still starts and stops cleanly after all of it.
    server = PhivaultServer(settings.data_dir, env=env)
    server.start()
    assert server.terminate() == 0
