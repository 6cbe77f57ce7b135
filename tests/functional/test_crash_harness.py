"""Crash consistency under mixed load (issue 9, item 4).

``phivault serve`` is killed with SIGKILL at a random moment while clients ingest over
STOW-RS, an admin reads and changes audited settings, a device uploads exams in chunks
(tus) and a clinician makes, opens and revokes share links; then the sweeper and the
upload housekeeping run, the server restarts, and the invariants are checked:

* every acknowledged instance is readable and bit-identical to its receipt's digest,
  whether it came over STOW-RS or as an upload whose finalize was acknowledged;
* nothing unacknowledged is half-visible (index rows, object and PHI rows all or nothing;
  study counters match their rows);
* no orphan object or PHI row after the sweeper; no PHI row without its exam;
* ``audit verify`` passes, and every acknowledged policy change, upload creation and
  finalize, share creation and revocation has its audit event;
* an unfinished upload holds exactly a prefix of what was sent: the device resumes it
  from the server's offset in the next round (under load again) and it arrives exactly
  once; no object of an ended upload is left, and after the expiry none at all (the upload
  the device abandoned each round is cleanly absent);
* an acknowledged share link still opens after the restart, or answers 404 once its
  revocation was acknowledged; access counts lie between the opens answered and the
  opens sent, each with its ``share.use`` event (details in ``factories/crash_load.py``).

Backups are not part of the load: phivault has no backup command yet (``phivault backup``
is a DESIGN.md contract still to be built); add them here when it exists.

``make test`` runs 3 rounds per database; ``make test-long`` 20.
The seed of the random kill moments and of the share steps is the test's parameter (in
its id), so a failing run can be replayed with ``PHIVAULT_CRASH_SEED``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from factories.accounts import AccountsFactory, Member
from factories.crash import check_consistent, send_all
from factories.crash_load import (
    DeviceUploads,
    SharedLink,
    ShareLinks,
    check_expired,
    check_shares,
    check_uploads,
    finalizer_leases_ran_out,
)
from factories.devices import issue_code
from factories.dicom_factory import make_instance, to_bytes
from factories.exams import ExamsFactory
from phivault.accounts.permissions import Role
from phivault.audit.actions import AuditAction
from phivault.audit.models import AuditRecord
from phivault.audit.verify import verify_log
from phivault.clock import ManualClock
from phivault.config.settings import Settings
from phivault.runtime import Runtime, build_runtime, initialise
from servers.phivault import PHIVAULT, PhivaultServer, phivault_env

ROUNDS = 3
LONG_ROUNDS = 20
SEED = int(os.environ.get("PHIVAULT_CRASH_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
PER_ROUND = 60  # instances offered per round; the kill comes first, usually
UPLOADS_PER_ROUND = 3  # device uploads per round (and one it abandons), ~23 KB each
SHARES_PER_ROUND = 3  # links made per round, each opened once or twice, half revoked
SHARED_EXAMS = 2
REOPENED_OLDER = 3  # links of earlier rounds opened again after each restart


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
    harness = _Harness(settings, seed)
    for round_number in range(rounds):
        harness.kill_during_load(round_number)
        harness.check_after_crash(f"round {round_number}")
    harness.last_restart(rounds)
    harness.check_after_crash("after the last restart")
    harness.check_after_expiry()


class _Harness:
    """The institution, its people and device, and what the server acknowledged so far."""

    def __init__(self, settings: Settings, seed: int) -> None:
        self.settings = settings
        self.kill_moments = random.Random(seed)
        # Apart, so that a seed gives the same kill moments whatever the steps draw.
        self.steps = random.Random(f"steps-{seed}")
        self.env = phivault_env(
            settings.data_dir,
            database_url=settings.database_url,
            phi_database_url=settings.phi_database_url,
            run_worker="false",
        )
        runtime = build_runtime(settings)
        initialise(runtime)
        accounts = AccountsFactory(runtime)
        institution = accounts.institution().id
        self.clinician = accounts.member(Role.CLINICIAN, institution)
        self.admin = accounts.member(Role.INSTITUTION_ADMIN, institution, mfa=True)
        self.code = issue_code(runtime, institution)
        # The exams shared during the rounds: stored before the first one.
        exams = [
            ExamsFactory(runtime).study(
                institution, study_uid=f"1.2.826.0.1.3680043.10.1444.79.{n}", instances=1
            )
            for n in range(1, SHARED_EXAMS + 1)
        ]
        runtime.close()
        self.device = DeviceUploads()
        self.shares = ShareLinks([exam.study_id for exam in exams])
        self.acknowledged: set[str] = set()  # SHA-256 of every instance acknowledged
        self.changes = 0  # acknowledged policy changes

    @contextlib.contextmanager
    def _serving(self) -> Iterator[PhivaultServer]:
        server = PhivaultServer(self.settings.data_dir, env=self.env)
        server.start()
        try:
            yield server
        finally:
            server.kill()  # nothing left running when a check fails; a no-op once it died

    def kill_during_load(self, round_number: int) -> None:
        runtime = build_runtime(self.settings)
        clinician_token, admin_token = _token(runtime, self.clinician), _token(runtime, self.admin)
        runtime.close()
        self.device.plan_round(round_number, UPLOADS_PER_ROUND)
        steps = self.shares.plan_round(self.steps, SHARES_PER_ROUND)
        with self._serving() as server:
            # Before the kill is armed: the device's one activation, or (after a restart)
            # the links of the last round and a few older ones answer as the database says.
            if round_number == 0:
                self.device.activate(server, self.code)
            else:
                self.shares.reopen(server, _links_to_reopen(self.shares, self.steps, round_number - 1))
            admin_load = _AdminLoad(server, admin_token)
            loads = [
                admin_load.thread,
                threading.Thread(target=self.device.run, args=(server,)),
                threading.Thread(target=self.shares.run, args=(server, clinician_token, round_number, steps)),
            ]
            for load in loads:
                load.start()
            delay = self.kill_moments.uniform(0.5, 4.0)

            def kill_later() -> None:
                time.sleep(delay)
                assert server.process is not None
                server.process.send_signal(signal.SIGKILL)

            killer = threading.Thread(target=kill_later)
            killer.start()
            self.acknowledged |= send_all(
                server, clinician_token, _payloads(round_number), stop_after=None, clients=3
            )
            killer.join()
            for load in loads:
                load.join(timeout=120)
                assert not load.is_alive(), f"round {round_number}: a load outlived the server"
            assert server.process is not None
            server.process.wait(60)
        self.changes += admin_load.acknowledged_changes
        _sweep(self.env, round_number)

    def check_after_crash(self, when: str) -> None:
        runtime = build_runtime(self.settings)
        try:
            # What a worker's upload housekeeping job does (the harness runs no worker).
            runtime.uploads.run_housekeeping()
            check_uploads(runtime, self.device, self.acknowledged)
            check_consistent(runtime, self.acknowledged)
            check_shares(runtime, self.shares)
            finalizer_leases_ran_out(runtime)
            _check_audit(runtime, when, self.changes)
        finally:
            runtime.close()

    def last_restart(self, rounds: int) -> None:
        """The server still starts and stops cleanly after all of it. Without a kill, every
        link answers as it should, the device finishes every upload a kill interrupted and
        sends one exam again (as after losing its records: answered duplicate, stored
        once), and one more round of share steps runs whole.
        """
        runtime = build_runtime(self.settings)
        clinician_token = _token(runtime, self.clinician)
        runtime.close()
        device, shares = self.device, self.shares
        with self._serving() as server:
            shares.reopen(server, shares.links)
            device.run(server)
            unfinished = [plan.client_ref for plan in device.unfinished()]
            assert unfinished == [], f"uploads not finished after the restart: {unfinished}"
            again = device.send_again(device.plans[0])
            device.run(server)
            assert again.receipt is not None, "an exam sent again was refused"
            assert again.receipt.status == "duplicate", again.receipt
            shares.run(server, clinician_token, rounds, shares.plan_round(self.steps, SHARES_PER_ROUND))
            assert len(shares.links) >= SHARES_PER_ROUND, "share steps without a kill were refused"
            assert server.terminate() == 0

    def check_after_expiry(self) -> None:
        """A day later (the upload expiry) nothing of the abandoned uploads is left."""
        later = ManualClock(datetime.now(UTC) + timedelta(hours=self.settings.upload_expiry_hours, minutes=1))
        runtime = build_runtime(self.settings, clock=later)
        try:
            runtime.uploads.run_housekeeping()
            runtime.uploads.run_housekeeping()  # whatever the first pass expired, this one cleans
            check_expired(runtime, self.device)
            _check_audit(runtime, "after the expiry", self.changes)
        finally:
            runtime.close()


def _links_to_reopen(shares: ShareLinks, rng: random.Random, last_round: int) -> list[SharedLink]:
    """The links made in ``last_round`` and a few older ones (all of them would grow with
    the rounds; the final restart opens every one).
    """
    newest = [link for link in shares.links if link.round_number == last_round]
    older = [link for link in shares.links if link.round_number < last_round]
    return newest + rng.sample(older, min(len(older), REOPENED_OLDER))


def _sweep(env: dict[str, str], round_number: int) -> None:
    swept = subprocess.run(
        [PHIVAULT, "ingest", "sweep", "--grace-seconds", "0", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert swept.returncode == 0, f"round {round_number}: {swept.stderr}"


def _check_audit(runtime: Runtime, when: str, changes: int) -> None:
    runtime.audit.integrate_pending(runtime.clock.now())
    report = verify_log(runtime.db)
    assert report.ok, f"{when}: audit verify failed"
    with runtime.db.transaction() as session:
        recorded = session.scalars(
            select(AuditRecord.id).where(AuditRecord.action == AuditAction.INGEST_POLICY_UPDATE.value)
        ).all()
    assert len(recorded) >= changes, f"{when}: an acknowledged change lost its event"
