"""Encryption of the few secrets accounts must read back (TOTP seeds).

One AES-256-GCM key, created on first use and stored wrapped by the keyring (as the audit
log keeps its checkpoint key); each value is bound to its purpose and owner through the
associated data, so a ciphertext copied onto another user's row does not decrypt.
"""

from __future__ import annotations

import secrets
import threading
from datetime import datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from phivault.accounts.models import AccountSecretKey
from phivault.crypto.keyring import Keyring, WrappedKey

KEY_ID = "accounts-secrets-v1"
_AAD_PREFIX = b"phivault/accounts-secret-key/"
_NONCE_BYTES = 12
_VERSION = b"\x01"


class SecretUnreadable(Exception):
    """A stored secret failed to decrypt (wrong row, tampering, or a lost key)."""


class SecretBox:
    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._aead: AESGCM | None = None
        self._lock = threading.Lock()

    def seal(self, session: Session, plaintext: bytes, *, purpose: str, owner: str, now: datetime) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return _VERSION + nonce + self._key(session, now).encrypt(nonce, plaintext, _aad(purpose, owner))

    def open(self, session: Session, sealed: bytes, *, purpose: str, owner: str, now: datetime) -> bytes:
        if len(sealed) < 1 + _NONCE_BYTES or sealed[:1] != _VERSION:
            raise SecretUnreadable
        nonce, ciphertext = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            return self._key(session, now).decrypt(nonce, ciphertext, _aad(purpose, owner))
        except InvalidTag:
            raise SecretUnreadable from None

    def _key(self, session: Session, now: datetime) -> AESGCM:
        with self._lock:
            if self._aead is not None:
                return self._aead
            row = session.get(AccountSecretKey, KEY_ID)
            if row is None:
                row = self._create(session, now)
            raw = self.keyring.unwrap(
                WrappedKey.from_bytes(row.wrapped_key), aad=_AAD_PREFIX + KEY_ID.encode()
            )
            self._aead = AESGCM(raw)
            return self._aead

    def _create(self, session: Session, now: datetime) -> AccountSecretKey:
        raw = AESGCM.generate_key(bit_length=256)
        wrapped = self.keyring.wrap(raw, aad=_AAD_PREFIX + KEY_ID.encode())
        row = AccountSecretKey(id=KEY_ID, wrapped_key=wrapped.to_bytes(), created_at=now)
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            # Another replica created it first: use theirs.
            existing = session.get(AccountSecretKey, KEY_ID, populate_existing=True)
            if existing is None:
                raise
            return existing
        return row


def _aad(purpose: str, owner: str) -> bytes:
    return f"phivault/accounts/{purpose}/{owner}".encode()
