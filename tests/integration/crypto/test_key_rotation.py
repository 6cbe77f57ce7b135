"""Key rotation.

It re-wraps keys, never rewrites objects, resumes after a crash, retires old versions only
once nothing references them, and keeps everything readable meanwhile.
"""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from phivault.audit.actions import AuditAction
from phivault.audit.models import AuditRecord
from phivault.audit.service import Actor, SystemSubject
from phivault.crypto.errors import KeyNotFound
from phivault.crypto.models import InstitutionKey, PatientKey, PurgeReason
from phivault.crypto.rotation import (
    ROOT_SETTLE,
    RotationProgress,
    key_status,
    run_rotation_batch,
    start_rotation,
)
from phivault.crypto.service import EncryptedObject, KeyHierarchy, ObjectContext
from phivault.runtime import Runtime
from servers.crypto_kit import Kit

OPERATOR = SystemSubject(Actor.system("test"))


class _Crash(Exception):
    """Stands in for the process dying mid-batch (the transaction never commits)."""


def _start(runtime: Runtime, institution_id: str | None) -> RotationProgress:
    with runtime.db.transaction() as session:
        return start_rotation(
            runtime.keys, session, institution_id=institution_id, actor=OPERATOR, now=runtime.clock.now()
        )


def _batch(runtime: Runtime, rotation_id: str, batch_size: int = 3) -> RotationProgress:
    with runtime.db.transaction() as session:
        return run_rotation_batch(
            runtime.keys, session, rotation_id, now=runtime.clock.now(), batch_size=batch_size
        )


def _finish(runtime: Runtime, progress: RotationProgress, batch_size: int = 3) -> RotationProgress:
    for _ in range(1000):
        if progress.done:
            return progress
        if progress.settle_until is not None and runtime.clock.now() < progress.settle_until:
            runtime.clock.set(progress.settle_until)  # type: ignore[attr-defined]
        progress = _batch(runtime, progress.id, batch_size)
    raise AssertionError("rotation did not finish")


def _institution_keys(runtime: Runtime, institution_id: str) -> list[tuple[int, str, int]]:
    with runtime.db.transaction() as session:
        rows = session.scalars(
            select(InstitutionKey)
            .where(InstitutionKey.institution_id == institution_id)
            .order_by(InstitutionKey.version)
        )
        return [(row.version, row.status, row.root_version) for row in rows]


def _wrapping_versions(runtime: Runtime, institution_id: str) -> set[int]:
    with runtime.db.transaction() as session:
        return set(
            session.scalars(
                select(InstitutionKey.version)
                .join(PatientKey, PatientKey.institution_key_id == InstitutionKey.id)
                .where(PatientKey.institution_id == institution_id, PatientKey.wrapped_key.is_not(None))
            )
        )


class _Population:
    """Patients with objects and PHI fields, and the object store bytes as first written."""

    def __init__(self, kit: Kit, institution_id: str, patients: int) -> None:
        self.kit = kit
        self.items: list[tuple[ObjectContext, EncryptedObject, bytes, bytes]] = []
        for n in range(patients):
            patient = kit.patient(institution_id)
            data = f"exam of patient {n} ".encode() * (300 + n)
            stored = kit.encrypt(patient, data)
            self.items.append((patient, stored, data, kit.encrypt_field(patient, f"PATIENT^{n}", b"name")))
        self.digests = self._digests()

    def _digests(self) -> list[str]:
        return [
            hashlib.sha256(self.kit.stored_bytes(stored.key)).hexdigest() for _, stored, _, _ in self.items
        ]

    def assert_readable_and_untouched(self) -> None:
        for n, (patient, stored, data, name) in enumerate(self.items):
            assert self.kit.read_all(stored.key, patient) == data
            assert self.kit.decrypt_field(patient, name, b"name") == f"PATIENT^{n}".encode()
        assert self._digests() == self.digests, "rotation must not rewrite objects"


def test_institution_rotation_rewraps_patient_keys_and_retires_the_old_version(
    kit: Kit, runtime: Runtime
) -> None:
    kit.institution("inst-a")
    population = _Population(kit, "inst-a", 8)
    progress = _start(runtime, "inst-a")
    assert (progress.from_version, progress.to_version, progress.total) == (1, 2, 8)
    # New patient keys use the new version at once.
    newcomer = kit.patient("inst-a")
    progress = _batch(runtime, progress.id)
    # Mid-way: the old version still wraps keys, so it is not retired.
    assert [status for _, status, _ in _institution_keys(runtime, "inst-a")] == ["previous", "current"]
    assert _wrapping_versions(runtime, "inst-a") == {1, 2}
    population.assert_readable_and_untouched()
    progress = _finish(runtime, progress)
    assert (progress.rewrapped, progress.total) == (8, 8)
    assert [status for _, status, _ in _institution_keys(runtime, "inst-a")] == ["retired", "current"]
    assert _wrapping_versions(runtime, "inst-a") == {2}
    runtime.keys.forget_all()
    population.assert_readable_and_untouched()
    assert kit.decrypt_field(newcomer, kit.encrypt_field(newcomer, "new", b"f"), b"f") == b"new"
    with runtime.db.transaction() as session:
        actions = list(session.scalars(select(AuditRecord.action)))
    assert AuditAction.KEY_ROTATE.value in actions
    assert AuditAction.KEY_RETIRE.value in actions


def test_rotation_of_another_institution_leaves_this_one_alone(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    kit.institution("inst-b")
    population = _Population(kit, "inst-b", 2)
    _finish(runtime, _start(runtime, "inst-a"))
    assert _institution_keys(runtime, "inst-b") == [(1, "current", 1)]
    population.assert_readable_and_untouched()


def test_crash_mid_batch_loses_nothing_and_running_again_completes(
    kit: Kit, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit.institution("inst-a")
    population = _Population(kit, "inst-a", 7)
    progress = _start(runtime, "inst-a")
    progress = _batch(runtime, progress.id)
    real_wrap = KeyHierarchy.wrap_patient_key
    calls = 0

    def crash_on_second_wrap(self: KeyHierarchy, *args: object, **kwargs: object) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:  # half-way through a batch
            raise _Crash
        return real_wrap(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(KeyHierarchy, "wrap_patient_key", crash_on_second_wrap)
    with pytest.raises(_Crash):
        _batch(runtime, progress.id)
    monkeypatch.undo()
    # Nothing of the crashed batch committed; every key still opens.
    population.assert_readable_and_untouched()
    # "Running it again": the command resumes the unfinished rotation instead of starting one.
    resumed = _start(runtime, "inst-a")
    assert resumed.id == progress.id
    assert resumed.rewrapped == progress.rewrapped
    done = _finish(runtime, resumed)
    assert done.rewrapped == 7
    assert _wrapping_versions(runtime, "inst-a") == {2}
    population.assert_readable_and_untouched()


def test_worker_runs_the_rotation_job_batch_by_batch_to_completion(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    population = _Population(kit, "inst-a", 5)
    progress = _start(runtime, "inst-a")
    worker = runtime.new_worker("test-worker")
    runs = 0
    while worker.run_once():
        runs += 1
    with runtime.db.transaction() as session:
        status = key_status(runtime.keys, session, now=runtime.clock.now(), rotation_days=365)
    finished = next(rotation for rotation in status.rotations if rotation.id == progress.id)
    assert finished.done
    assert runs >= 1
    assert _wrapping_versions(runtime, "inst-a") == {2}
    population.assert_readable_and_untouched()


def test_destroyed_patient_key_stays_destroyed_through_rotation(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    population = _Population(kit, "inst-a", 3)
    shredded = population.items[0][0]
    progress = _start(runtime, "inst-a")
    with runtime.db.transaction() as session:
        runtime.keys.destroy_patient_key(
            session,
            shredded.patient_key_id,
            actor=OPERATOR,
            reason=PurgeReason.ADMINISTRATIVE,
            now=runtime.clock.now(),
        )
    _finish(runtime, progress)
    with runtime.db.transaction() as session:
        row = session.get(PatientKey, shredded.patient_key_id)
        assert row is not None
        assert row.wrapped_key is None


def test_rotating_an_institution_without_a_key_is_refused(runtime: Runtime) -> None:
    with pytest.raises(KeyNotFound):
        _start(runtime, "inst-unknown")


def test_root_rotation_rewraps_institution_keys_then_retires_old_root_versions(
    kit: Kit, runtime: Runtime
) -> None:
    runtime.keyring.check()
    kit.institution("inst-a")
    kit.institution("inst-b")
    population = _Population(kit, "inst-a", 3)
    progress = _start(runtime, None)
    assert (progress.from_version, progress.to_version, progress.total) == (1, 2, 2)
    progress = _batch(runtime, progress.id, batch_size=1)
    progress = _batch(runtime, progress.id, batch_size=1)
    progress = _batch(runtime, progress.id, batch_size=1)
    # Every institution key moved, but the old root version waits out the settle delay.
    assert progress.status == "settling"
    assert {
        root for _, _, root in _institution_keys(runtime, "inst-a") + _institution_keys(runtime, "inst-b")
    } == {2}
    assert not any(v.retired for v in runtime.keyring.versions())
    runtime.clock.advance(ROOT_SETTLE - timedelta(seconds=1))  # type: ignore[attr-defined]
    assert _batch(runtime, progress.id).status == "settling"
    runtime.clock.advance(timedelta(seconds=1))  # type: ignore[attr-defined]
    progress = _batch(runtime, progress.id)
    assert progress.done
    assert progress.retired_version == 1
    assert [(v.version, v.retired) for v in runtime.keyring.versions()] == [(1, True), (2, False)]
    runtime.keys.forget_all()  # unwrap through the keyring, under the new root version
    population.assert_readable_and_untouched()


def test_root_version_still_wrapping_the_audit_signing_key_is_not_retired(kit: Kit, runtime: Runtime) -> None:
    with runtime.db.transaction() as session:
        runtime.audit.signer(session, runtime.clock.now())  # wrapped under root version 1
    kit.institution("inst-a")
    population = _Population(kit, "inst-a", 2)
    done = _finish(runtime, _start(runtime, None))
    assert done.retired_version is None
    assert not any(v.retired for v in runtime.keyring.versions())
    with runtime.db.transaction() as session:
        status = key_status(runtime.keys, session, now=runtime.clock.now(), rotation_days=365)
    assert [(v.version, v.wraps) for v in status.root_versions] == [(1, 1), (2, 1)]
    runtime.keys.forget_all()
    population.assert_readable_and_untouched()


def test_reads_keep_working_while_rotation_batches_run(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    population = _Population(kit, "inst-a", 6)
    stop = threading.Event()
    failures: list[BaseException] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                runtime.keys.forget_all()  # force unwrapping through the rows being rewritten
                population.assert_readable_and_untouched()
                reads[0] += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for institution_id in ("inst-a", None, "inst-a"):
            progress = _start(runtime, institution_id)
            while not progress.done:
                if progress.settle_until is not None:
                    runtime.clock.set(progress.settle_until)  # type: ignore[attr-defined]
                progress = _batch(runtime, progress.id, batch_size=1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == []
    assert reads[0] > 0
    assert _institution_keys(runtime, "inst-a")[-1][:2] == (3, "current")
    population.assert_readable_and_untouched()


def test_status_reports_versions_ages_wraps_and_overdue_keys(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    _Population(kit, "inst-a", 4)
    with runtime.db.transaction() as session:
        fresh = key_status(runtime.keys, session, now=runtime.clock.now(), rotation_days=365)
    assert fresh.overdue == []
    assert [(k.institution_id, k.version, k.status, k.wraps) for k in fresh.institution_keys] == [
        ("inst-a", 1, "current", 4)
    ]
    assert fresh.patient_keys == 4
    later = runtime.clock.now() + timedelta(days=366)
    with runtime.db.transaction() as session:
        old = key_status(runtime.keys, session, now=later, rotation_days=365)
    assert set(old.overdue) == {"root", "inst-a"}
    assert old.institution_keys[0].age_days == 366
