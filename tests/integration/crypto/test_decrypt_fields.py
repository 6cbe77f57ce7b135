"""``KeyHierarchy.decrypt_fields``: many PHI values of many patients in one call, with the
same guarantees as ``decrypt_field`` (binding, tampering, shredding, unknown keys).
"""

from __future__ import annotations

import pytest

from phivault.audit.service import Actor, SystemSubject
from phivault.crypto.errors import KeyNotFound, KeyShredded, ObjectIntegrityError
from phivault.crypto.models import PurgeReason
from phivault.crypto.service import SealedField
from phivault.runtime import Runtime
from servers.crypto_kit import Kit


def test_values_of_several_patients_open_in_one_call(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    alice, bob = kit.patient("inst-a"), kit.patient("inst-a")
    fields = [
        SealedField(alice.patient_key_id, kit.encrypt_field(alice, "DOE^JANE", b"t/c/1"), b"t/c/1"),
        SealedField(bob.patient_key_id, kit.encrypt_field(bob, "ROE^RICHARD", b"t/c/2"), b"t/c/2"),
        SealedField(alice.patient_key_id, kit.encrypt_field(alice, "19470312", b"t/d/1"), b"t/d/1"),
    ]
    with runtime.db.transaction() as session:
        assert runtime.keys.decrypt_fields(session, fields) == [b"DOE^JANE", b"ROE^RICHARD", b"19470312"]
        assert runtime.keys.decrypt_fields(session, []) == []


def test_a_value_bound_elsewhere_tampered_or_of_another_patient_fails(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    alice_context, bob_context = kit.patient("inst-a"), kit.patient("inst-a")
    alice, bob = alice_context.patient_key_id, bob_context.patient_key_id
    sealed = kit.encrypt_field(alice_context, "DOE^JANE", b"t/c/1")
    flipped = bytes([*sealed[:-1], sealed[-1] ^ 1])
    for wrong in (
        SealedField(alice, sealed, b"t/c/2"),
        SealedField(bob, sealed, b"t/c/1"),
        SealedField(alice, flipped, b"t/c/1"),
        SealedField(alice, sealed[:12], b"t/c/1"),
    ):
        with runtime.db.transaction() as session, pytest.raises(ObjectIntegrityError):
            runtime.keys.decrypt_fields(session, [SealedField(alice, sealed, b"t/c/1"), wrong])
    with runtime.db.transaction() as session, pytest.raises(KeyNotFound):
        runtime.keys.decrypt_fields(session, [SealedField("no-such-key", sealed, b"t/c/1")])


def test_a_shredded_patient_no_longer_opens(kit: Kit, runtime: Runtime) -> None:
    kit.institution("inst-a")
    context = kit.patient("inst-a")
    alice = context.patient_key_id
    sealed = kit.encrypt_field(context, "DOE^JANE", b"t/c/1")
    with runtime.db.transaction() as session:
        runtime.keys.destroy_patient_key(
            session,
            alice,
            actor=SystemSubject(Actor.system("tests")),
            reason=PurgeReason.ERASURE_REQUEST,
            now=runtime.clock.now(),
        )
    with runtime.db.transaction() as session, pytest.raises(KeyShredded):
        runtime.keys.decrypt_fields(session, [SealedField(alice, sealed, b"t/c/1")])
