"""Errors raised by ``phivault.crypto``.

Errors about data read back (ciphertext, headers) carry no detail: a message that told a
bad tag from a bad header, a wrong key or a short object would hand an attacker who can
write to the object store an oracle. Errors about a caller's own arguments may say what
is wrong, because they describe nothing the caller did not already know.
"""

from __future__ import annotations

from typing import ClassVar


class CryptoError(Exception):
    """Base class of phivault's cryptographic errors."""

    default_message: ClassVar[str] = "cryptographic operation failed"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)


class ObjectIntegrityError(CryptoError):
    """An encrypted object is malformed, tampered with, truncated, extended or under another key.

    Deliberately one type with one fixed message for every way reading an object can
    fail, and raised ``from None`` so no underlying exception leaks into logs or responses.
    """

    default_message = "encrypted object failed its integrity check"

    def __init__(self) -> None:
        super().__init__()

    def __reduce__(self) -> tuple[type[ObjectIntegrityError], tuple[()]]:
        # The constructor takes no message, so rebuild from nothing (pickling for workers).
        return (type(self), ())


class InvalidParameterError(CryptoError, ValueError):
    """A caller passed a key, size, key id or range outside what the format allows."""

    default_message = "invalid cryptographic parameter"


class KeyShredded(CryptoError):
    """The patient key that protects this data was destroyed (crypto-shredding): it is gone for good.

    Carries no detail: which object or field was asked for is the caller's own knowledge.
    """

    default_message = "the data was shredded: its patient key was destroyed"

    def __init__(self) -> None:
        super().__init__()

    def __reduce__(self) -> tuple[type[KeyShredded], tuple[()]]:
        return (type(self), ())


class KeyNotFound(CryptoError, LookupError):
    """No key with that id exists for that institution (or the institution has no key yet)."""

    default_message = "no such key"


class KeyIntegrityError(CryptoError):
    """A stored (wrapped) key failed authentication: its database row was altered or moved.

    One fixed message and no detail, like ``ObjectIntegrityError``.
    """

    default_message = "a stored key failed its integrity check"

    def __init__(self) -> None:
        super().__init__()

    def __reduce__(self) -> tuple[type[KeyIntegrityError], tuple[()]]:
        return (type(self), ())


class RotationInProgress(CryptoError):
    """Another rotation of the same scope was started at the same moment."""

    default_message = "a rotation of this key is already in progress"
