"""The institution's ingest secret and the keys derived from it.

One random 32-byte secret per institution, sealed with ``KeyHierarchy.encrypt_field`` under
a key of its own in the hierarchy (a ``patient_keys`` row no patient uses), so root and
institution key rotation re-wrap it like every other key and no new wrapping code exists.
HKDF-SHA256 (RFC 5869) derives one key per purpose (key separation):

* ``uid``: the UID remapping and per-patient date offsets of de-identification;
* ``blind_index``: HMAC-SHA256 blind indexes of the PHI store (exact match without
  decrypting).

The secret never changes for the institution's life: remapped UIDs and blind indexes
computed today must match tomorrow's. Unsealed secrets are cached in-process for a few
minutes (like institution keys), so an ingest does not unwrap keys for every instance.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import exists, select
from sqlalchemy.exc import IntegrityError

from phivault.clock import Clock
from phivault.crypto.errors import InvalidParameterError
from phivault.crypto.models import InstitutionKey
from phivault.crypto.service import KeyHierarchy
from phivault.db.engine import Database
from phivault.exams.models import InstitutionSecret

SECRET_BYTES: Final = 32
_CACHE_TTL: Final = timedelta(minutes=5)


def _sealed_aad(institution_id: str) -> bytes:
    return b"institution_secrets/sealed_secret/" + institution_id.encode()


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"phivault/exams/" + purpose).derive(
        secret
    )


@dataclass(frozen=True, slots=True)
class IngestSecret:
    """The derived keys of one institution."""

    uid: bytes
    blind_index: bytes

    def blind(self, *parts: str) -> str:
        """The blind index of ``parts`` (length-prefixed, so no two tuples collide)."""
        message = b"".join(len(p.encode()).to_bytes(4, "big") + p.encode() for p in parts)
        return hmac.new(self.blind_index, message, hashlib.sha256).hexdigest()

    def derived_id(self, kind: str, value: str) -> str:
        """A stable UUIDv4-shaped row id for ``value`` (a remapped UID): every replica and
        every concurrent ingest of the same study, series or instance picks the same id.
        """
        digest = hmac.new(self.uid, b"id\x00" + kind.encode() + b"\x00" + value.encode(), hashlib.sha256)
        return str(uuid.UUID(bytes=digest.digest()[:16], version=4))


class InstitutionSecrets:
    """Creates (once) and opens institutions' ingest secrets."""

    def __init__(self, db: Database, keys: KeyHierarchy, clock: Clock) -> None:
        self._db = db
        self._keys = keys
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[datetime, IngestSecret]] = {}

    def get(self, institution_id: str) -> IngestSecret:
        now = self._clock.now()
        with self._lock:
            cached = self._cache.get(institution_id)
            if cached is not None and cached[0] > now:
                return cached[1]
        secret = self._load_or_create(institution_id)
        with self._lock:
            self._cache[institution_id] = (now + _CACHE_TTL, secret)
        return secret

    def forget_all(self) -> None:
        with self._lock:
            self._cache.clear()

    def _load_or_create(self, institution_id: str) -> IngestSecret:
        for _ in range(3):
            with self._db.read() as session:
                row = session.get(InstitutionSecret, institution_id)
                if row is not None:
                    raw = self._keys.decrypt_field(
                        session, row.patient_key_id, row.sealed_secret, aad=_sealed_aad(institution_id)
                    )
                    return IngestSecret(uid=_derive(raw, b"uid"), blind_index=_derive(raw, b"blind-index"))
            try:
                self._create(institution_id)
            except (IntegrityError, InvalidParameterError):
                continue  # another process created it (or the institution key) first
        msg = "the institution secret could not be created"
        raise RuntimeError(msg)

    def _create(self, institution_id: str) -> None:
        now = self._clock.now()
        with self._db.transaction() as session:
            has_key = session.scalar(select(exists().where(InstitutionKey.institution_id == institution_id)))
            if not has_key:
                self._keys.new_institution_key(session, institution_id, now)
            key_id = self._keys.new_patient_key(session, institution_id, now)
            sealed = self._keys.encrypt_field(
                session, key_id, os.urandom(SECRET_BYTES), aad=_sealed_aad(institution_id)
            )
            session.add(
                InstitutionSecret(
                    institution_id=institution_id, patient_key_id=key_id, sealed_secret=sealed, created_at=now
                )
            )
