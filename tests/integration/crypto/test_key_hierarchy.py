"""The key hierarchy through its public API.

Objects and fields round-trip; tampering and swapping fail with one opaque error and a
security alert; tenants stay apart.
"""

from __future__ import annotations

import hashlib
import io
import random
import tracemalloc
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from phivault.audit.actions import AuditAction
from phivault.audit.models import AuditRecord
from phivault.crypto.errors import (
    InvalidParameterError,
    KeyIntegrityError,
    KeyNotFound,
    ObjectIntegrityError,
)
from phivault.crypto.models import InstitutionKey, PatientKey
from phivault.crypto.service import ObjectContext
from phivault.crypto.stream import read_header
from phivault.runtime import Runtime
from servers.crypto_kit import SEGMENT, Kit

TAG = 16


def _data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _integrity_alerts(runtime: Runtime) -> list[str | None]:
    runtime.keys.wait_for_alarms()
    with runtime.db.transaction() as session:
        return list(
            session.scalars(
                select(AuditRecord.object_id).where(
                    AuditRecord.action == AuditAction.OBJECT_INTEGRITY_FAILURE.value
                )
            )
        )


def test_object_round_trips_and_reports_plaintext_size_and_sha256(kit: Kit) -> None:
    kit.institution("inst-a")
    patient = kit.patient("inst-a")
    data = _data(3 * SEGMENT + 123)
    stored = kit.encrypt(patient, data)
    assert stored.key.startswith("instance/")
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.ciphertext_size == kit.runtime.store.size(stored.key)
    assert data[:64] not in kit.stored_bytes(stored.key)
    opened = kit.open(stored.key, patient)
    assert opened.plaintext_size == len(data)
    assert opened.read(0, len(data)) == data
    assert b"".join(opened.iter_plaintext()) == data


def test_empty_object_round_trips(kit: Kit) -> None:
    kit.institution("inst-a")
    patient = kit.patient("inst-a")
    stored = kit.encrypt(patient, b"")
    opened = kit.open(stored.key, patient)
    assert opened.plaintext_size == 0
    assert opened.read(0, 0) == b""
    assert b"".join(opened.iter_plaintext()) == b""


def test_range_reads_through_open_object_match_plaintext_slices(kit: Kit) -> None:
    kit.institution("inst-a")
    patient = kit.patient("inst-a")
    data = _data(5 * SEGMENT + 7, seed=1)
    opened = kit.open(kit.encrypt(patient, data).key, patient)
    rng = random.Random(2)
    ranges = [(0, 1), (SEGMENT - 1, 2), (SEGMENT, SEGMENT), (len(data) - 7, 7), (len(data), 0)]
    ranges += [(start, rng.randrange(len(data) - start + 1)) for start in rng.sample(range(len(data)), 20)]
    for offset, length in ranges:
        assert opened.read(offset, length) == data[offset : offset + length]
        assert b"".join(opened.iter_range(offset, length)) == data[offset : offset + length]


class _Zeros:
    """A readable of ``size`` zero bytes that never exists in memory at once."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, size: int = -1) -> bytes:
        count = self.left if size < 0 else min(size, self.left)
        self.left -= count
        return bytes(count)


def test_encrypting_a_large_object_keeps_memory_flat(kit: Kit) -> None:
    kit.institution("inst-a")
    patient = kit.patient("inst-a")
    size = 48 << 20
    tracemalloc.start()
    try:
        with kit.runtime.db.transaction() as session:
            stored = kit.runtime.keys.encrypt_object(
                kit.runtime.store,
                _Zeros(size),  # read() is all encrypt_object uses
                session=session,
                context=patient,
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stored.size == size
    assert peak < 12 << 20, f"peak {peak} bytes for a {size}-byte object"


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_tampered_segment_fails_through_open_object_and_raises_an_alert(kit: Kit, position: str) -> None:
    kit.institution("inst-a")
    patient = kit.patient("inst-a")
    data = _data(4 * SEGMENT + 100, seed=3)
    stored = kit.encrypt(patient, data)
    ciphertext = bytearray(kit.stored_bytes(stored.key))
    header_size = read_header(io.BytesIO(ciphertext)).size
    segment = {"first": 0, "middle": 2, "last": 4}[position]
    ciphertext[header_size + segment * (SEGMENT + TAG) + 5] ^= 0x01
    kit.replace_stored(stored.key, bytes(ciphertext))
    opened = kit.open(stored.key, patient)
    start = segment * SEGMENT
    with pytest.raises(ObjectIntegrityError):
        opened.read(start, min(SEGMENT, len(data) - start))
    with pytest.raises(ObjectIntegrityError):
        b"".join(opened.iter_plaintext())
    # Untouched segments still read: a range read proves its own range.
    other = 1 if segment != 1 else 3
    assert opened.read(other * SEGMENT, 10) == data[other * SEGMENT : other * SEGMENT + 10]
    assert _integrity_alerts(kit.runtime) == [stored.key, stored.key]


def test_tampered_header_fails_to_open(kit: Kit) -> None:
    kit.institution("inst-a")
    patient = kit.patient("inst-a")
    stored = kit.encrypt(patient, _data(SEGMENT))
    ciphertext = bytearray(kit.stored_bytes(stored.key))
    ciphertext[20] ^= 0x80  # inside the salt
    kit.replace_stored(stored.key, bytes(ciphertext))
    with pytest.raises(ObjectIntegrityError):
        kit.read_all(stored.key, patient)
    assert _integrity_alerts(kit.runtime) == [stored.key]


def test_truncated_object_fails(kit: Kit) -> None:
    kit.institution("inst-a")
    patient = kit.patient("inst-a")
    stored = kit.encrypt(patient, _data(2 * SEGMENT + 5))
    kit.replace_stored(stored.key, kit.stored_bytes(stored.key)[: -(5 + TAG)])
    with pytest.raises(ObjectIntegrityError):
        kit.read_all(stored.key, patient)


def test_object_swapped_between_rows_of_one_patient_fails(kit: Kit) -> None:
    kit.institution("inst-a")
    patient = kit.patient("inst-a")
    first = kit.encrypt(patient, b"first object" * 100)
    second = kit.encrypt(patient, b"second object" * 100)
    kit.replace_stored(first.key, kit.stored_bytes(second.key))
    with pytest.raises(ObjectIntegrityError):
        kit.read_all(first.key, patient)
    assert kit.read_all(second.key, patient) == b"second object" * 100


def test_another_patients_object_in_this_patients_row_fails(kit: Kit) -> None:
    kit.institution("inst-a")
    alice, bob = kit.patient("inst-a"), kit.patient("inst-a")
    alices = kit.encrypt(alice, b"alice")
    bobs = kit.encrypt(bob, b"bob")
    kit.replace_stored(alices.key, kit.stored_bytes(bobs.key))
    with pytest.raises(ObjectIntegrityError):
        kit.read_all(alices.key, alice)


def test_object_read_as_another_institution_is_not_found(kit: Kit) -> None:
    kit.institution("inst-a")
    kit.institution("inst-b")
    patient = kit.patient("inst-a")
    stored = kit.encrypt(patient, b"data")
    intruder = ObjectContext("inst-b", patient.patient_key_id, "instance")
    with pytest.raises(KeyNotFound):
        kit.read_all(stored.key, intruder)


def test_phi_field_round_trips_and_is_bound_to_its_aad_and_patient(kit: Kit) -> None:
    kit.institution("inst-a")
    alice, bob = kit.patient("inst-a"), kit.patient("inst-a")
    sealed = kit.encrypt_field(alice, "DOE^JANE", b"phi_patients/name/row-1")
    assert b"DOE" not in sealed
    assert kit.decrypt_field(alice, sealed, b"phi_patients/name/row-1") == b"DOE^JANE"
    assert kit.encrypt_field(alice, "DOE^JANE", b"phi_patients/name/row-1") != sealed  # fresh nonce
    with pytest.raises(ObjectIntegrityError):
        kit.decrypt_field(alice, sealed, b"phi_patients/name/row-2")
    with pytest.raises(ObjectIntegrityError):
        kit.decrypt_field(bob, sealed, b"phi_patients/name/row-1")
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(ObjectIntegrityError):
        kit.decrypt_field(alice, bytes(flipped), b"phi_patients/name/row-1")
    with pytest.raises(ObjectIntegrityError):
        kit.decrypt_field(alice, sealed[:10], b"phi_patients/name/row-1")


def test_wrapped_patient_key_copied_to_another_row_does_not_open(kit: Kit) -> None:
    kit.institution("inst-a")
    alice, bob = kit.patient("inst-a"), kit.patient("inst-a")
    with kit.runtime.db.transaction() as session:
        alices = session.scalar(select(PatientKey.wrapped_key).where(PatientKey.id == alice.patient_key_id))
        session.execute(
            update(PatientKey).where(PatientKey.id == bob.patient_key_id).values(wrapped_key=alices)
        )
    with pytest.raises(KeyIntegrityError):
        kit.encrypt_field(bob, "x", b"aad")


def test_wrapped_institution_key_moved_to_another_institution_does_not_open(kit: Kit) -> None:
    kit.institution("inst-a")
    kit.institution("inst-b")
    patient_b = kit.patient("inst-b")
    kit.runtime.keys.forget_all()
    with kit.runtime.db.transaction() as session:
        wrapped_a = session.scalar(
            select(InstitutionKey.wrapped_key).where(InstitutionKey.institution_id == "inst-a")
        )
        session.execute(
            update(InstitutionKey)
            .where(InstitutionKey.institution_id == "inst-b")
            .values(wrapped_key=wrapped_a)
        )
    with pytest.raises(KeyIntegrityError):
        kit.encrypt_field(patient_b, "x", b"aad")


def test_patient_key_needs_an_institution_key_and_institution_keys_are_created_once(kit: Kit) -> None:
    with pytest.raises(KeyNotFound):
        kit.patient("inst-without-key")
    kit.institution("inst-a")
    with pytest.raises(InvalidParameterError):
        kit.institution("inst-a")


def test_unwrapped_institution_keys_are_cached_for_five_minutes_only(kit: Kit, runtime: Runtime) -> None:
    key_id = kit.institution("inst-a")
    runtime.keys.forget_all()
    patient = kit.patient("inst-a")
    assert runtime.keys.is_cached(key_id)
    runtime.clock.advance(timedelta(minutes=5, seconds=1))  # type: ignore[attr-defined]
    assert not runtime.keys.is_cached(key_id)
    stored = kit.encrypt(patient, b"after expiry")
    assert kit.read_all(stored.key, patient) == b"after expiry"


def test_object_bytes_do_not_contain_the_dek_or_patient_key_in_clear(kit: Kit) -> None:
    kit.institution("inst-a")
    patient = kit.patient("inst-a")
    stored = kit.encrypt(patient, b"x" * 100)
    opened = kit.open(stored.key, patient)
    assert opened._dek not in kit.stored_bytes(stored.key)  # the secret itself


def test_prepared_object_is_written_outside_any_transaction_and_only_once(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    patient = kit.patient("inst-a")
    with runtime.db.transaction() as session:
        pending = runtime.keys.prepare_object(session, patient)
    # The database is free while the object streams: another writer commits meanwhile.
    other = kit.patient("inst-a")
    stored = pending.write(runtime.store, io.BytesIO(b"uploaded after commit"))
    assert stored.key == pending.key
    assert kit.read_all(stored.key, patient) == b"uploaded after commit"
    assert other.patient_key_id != patient.patient_key_id
    with pytest.raises(InvalidParameterError):
        pending.write(runtime.store, io.BytesIO(b"again"))
