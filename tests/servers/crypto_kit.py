"""Short calls for the key hierarchy tests: institutions, patients and objects in a runtime."""

from __future__ import annotations

import io
from dataclasses import dataclass

from phivault.crypto.service import EncryptedObject, ObjectContext, OpenedObject
from phivault.crypto.stream import MIN_SEGMENT_SIZE
from phivault.runtime import Runtime

SEGMENT = MIN_SEGMENT_SIZE  # small segments: multi-segment objects stay small


@dataclass
class Kit:
    """Short calls for the tests; each one is its own transaction, as in a request."""

    runtime: Runtime

    def institution(self, institution_id: str) -> str:
        with self.runtime.db.transaction() as session:
            return self.runtime.keys.new_institution_key(session, institution_id, self.runtime.clock.now())

    def patient(self, institution_id: str, kind: str = "instance") -> ObjectContext:
        with self.runtime.db.transaction() as session:
            patient_key_id = self.runtime.keys.new_patient_key(
                session, institution_id, self.runtime.clock.now()
            )
        return ObjectContext(institution_id=institution_id, patient_key_id=patient_key_id, kind=kind)

    def encrypt(self, context: ObjectContext, data: bytes) -> EncryptedObject:
        with self.runtime.db.transaction() as session:
            return self.runtime.keys.encrypt_object(
                self.runtime.store, io.BytesIO(data), session=session, context=context, segment_size=SEGMENT
            )

    def open(self, key: str, context: ObjectContext) -> OpenedObject:
        with self.runtime.db.transaction() as session:
            return self.runtime.keys.open_object(self.runtime.store, key, session=session, context=context)

    def read_all(self, key: str, context: ObjectContext) -> bytes:
        opened = self.open(key, context)
        return opened.read(0, opened.plaintext_size)

    def encrypt_field(self, context: ObjectContext, value: str, aad: bytes) -> bytes:
        with self.runtime.db.transaction() as session:
            return self.runtime.keys.encrypt_field(session, context.patient_key_id, value, aad=aad)

    def decrypt_field(self, context: ObjectContext, sealed: bytes, aad: bytes) -> bytes:
        with self.runtime.db.transaction() as session:
            return self.runtime.keys.decrypt_field(session, context.patient_key_id, sealed, aad=aad)

    def stored_bytes(self, key: str) -> bytes:
        with self.runtime.store.open(key) as handle:
            return handle.read()

    def replace_stored(self, key: str, data: bytes) -> None:
        """Overwrite an object behind phivault's back (an attacker with store access)."""
        self.runtime.store.delete(key)
        self.runtime.store.put(key, io.BytesIO(data))
