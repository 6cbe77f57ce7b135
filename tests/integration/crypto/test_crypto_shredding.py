"""Crypto-shredding: destroying a patient key makes all that patient's data unreadable."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError

from phivault.audit.actions import ActorType, AuditAction
from phivault.audit.models import AuditRecord
from phivault.audit.service import Actor, SystemSubject
from phivault.crypto.errors import KeyNotFound, KeyShredded
from phivault.crypto.models import PatientKey, PurgeLedgerEntry, PurgeReason
from phivault.crypto.service import ObjectContext
from phivault.runtime import Runtime
from servers.crypto_kit import Kit

OPERATOR = SystemSubject(Actor(ActorType.USER, "user-7"))


def _destroy(runtime: Runtime, patient: ObjectContext, subject: SystemSubject = OPERATOR) -> str:
    with runtime.db.transaction() as session:
        return runtime.keys.destroy_patient_key(
            session,
            patient.patient_key_id,
            actor=subject,
            reason=PurgeReason.ERASURE_REQUEST,
            now=runtime.clock.now(),
        )


def test_destroyed_patient_key_makes_every_object_and_field_raise_shredded(
    kit: Kit, runtime: Runtime
) -> None:
    kit.institution("inst-a")
    alice, bob = kit.patient("inst-a"), kit.patient("inst-a")
    alices = [kit.encrypt(alice, f"exam {n}".encode() * 2000) for n in range(3)]
    alice_name = kit.encrypt_field(alice, "DOE^ALICE", b"name")
    bobs = kit.encrypt(bob, b"bob's exam")
    bob_name = kit.encrypt_field(bob, "DOE^BOB", b"name")

    _destroy(runtime, alice)

    for stored in alices:
        with pytest.raises(KeyShredded, match="shredded"):
            kit.open(stored.key, alice)
    with pytest.raises(KeyShredded):
        kit.decrypt_field(alice, alice_name, b"name")
    with pytest.raises(KeyShredded):
        kit.encrypt(alice, b"new data for a shredded patient")
    with pytest.raises(KeyShredded):
        kit.encrypt_field(alice, "x", b"name")
    # Other patients are unaffected.
    assert kit.read_all(bobs.key, bob) == b"bob's exam"
    assert kit.decrypt_field(bob, bob_name, b"name") == b"DOE^BOB"


def test_object_opened_before_destruction_cannot_be_opened_again(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    alice = kit.patient("inst-a")
    stored = kit.encrypt(alice, b"x" * 10_000)
    assert kit.read_all(stored.key, alice) == b"x" * 10_000  # patient keys are not cached
    _destroy(runtime, alice)
    with pytest.raises(KeyShredded):
        kit.read_all(stored.key, alice)


def test_destruction_is_recorded_in_the_purge_ledger_and_audit_log(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    alice = kit.patient("inst-a")
    entry_id = _destroy(runtime, alice)
    with runtime.db.transaction() as session:
        entry = session.get(PurgeLedgerEntry, entry_id)
        assert entry is not None
        assert (entry.patient_key_id, entry.institution_id, entry.reason) == (
            alice.patient_key_id,
            "inst-a",
            "erasure_request",
        )
        assert (entry.actor_type, entry.actor_id, entry.destroyed_at) == (
            "user",
            "user-7",
            runtime.clock.now(),
        )
        row = session.get(PatientKey, alice.patient_key_id)
        assert row is not None
        assert row.wrapped_key is None
        assert row.destroyed_at == runtime.clock.now()
        shred = session.scalars(
            select(AuditRecord).where(AuditRecord.action == AuditAction.KEY_SHRED.value)
        ).one()
        assert (shred.object_type, shred.object_id, shred.institution_id) == (
            "patient_key",
            alice.patient_key_id,
            "inst-a",
        )


def test_destroying_twice_returns_the_same_ledger_entry(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    alice = kit.patient("inst-a")
    assert _destroy(runtime, alice) == _destroy(runtime, alice)
    with runtime.db.transaction() as session:
        assert len(session.scalars(select(PurgeLedgerEntry)).all()) == 1


def test_purge_ledger_refuses_update_and_delete(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    entry_id = _destroy(runtime, kit.patient("inst-a"))
    with pytest.raises(SQLAlchemyError, match="append-only"), runtime.db.transaction() as session:
        session.execute(update(PurgeLedgerEntry).where(PurgeLedgerEntry.id == entry_id).values(reason="x"))
    with pytest.raises(SQLAlchemyError, match="append-only"), runtime.db.transaction() as session:
        session.execute(delete(PurgeLedgerEntry))


def test_an_institutions_actor_cannot_destroy_another_institutions_patient_key(
    kit: Kit, runtime: Runtime
) -> None:
    kit.institution("inst-a")
    alice = kit.patient("inst-a")
    with pytest.raises(KeyNotFound):
        _destroy(runtime, alice, SystemSubject(Actor(ActorType.USER, "user-9"), "inst-b"))
    assert kit.decrypt_field(alice, kit.encrypt_field(alice, "still here", b"f"), b"f") == b"still here"


def test_unknown_patient_key_is_not_found(runtime: Runtime) -> None:
    with pytest.raises(KeyNotFound):
        _destroy(runtime, ObjectContext("inst-a", "no-such-key", "instance"))
