"""Errors raised by keyrings.

No message ever carries key material, a PIN, a token or a ciphertext. ``KeyUnwrapError``
carries nothing at all: whether the tag, the associated data or the bytes were wrong is
exactly what an attacker who can edit a wrapped key in the database would like to learn.
The others describe configuration and versions, which are not secret.
"""

from __future__ import annotations

from typing import ClassVar


class KeyringError(Exception):
    """Base class of every keyring error."""

    default_message: ClassVar[str] = "keyring operation failed"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)


class KeyringConfigError(KeyringError, ValueError):
    """``PHIVAULT_KEYRING_URL`` is malformed, names an unknown backend, or carries a secret."""

    default_message = "invalid keyring URL"


class KeyringUnavailable(KeyringError):
    """The keyring cannot be used now: wrong master key, missing token or PIN, server down or sealed.

    The message says what to fix; ``phivault serve`` prints it and refuses to start.
    """

    default_message = "keyring unavailable"


class KeyUnwrapError(KeyringError):
    """A wrapped key did not open: tampered, truncated, or bound to other associated data.

    One type and one fixed message for every such failure, raised ``from None``.
    """

    default_message = "wrapped key could not be unwrapped"

    def __init__(self) -> None:
        super().__init__()

    def __reduce__(self) -> tuple[type[KeyUnwrapError], tuple[()]]:
        # The constructor takes no message, so rebuild from nothing (pickling for workers).
        return (type(self), ())


class UnknownRootKey(KeyringError):
    """A wrapped key names a root key or version this keyring does not hold."""

    default_message = "the root key of this wrapped key is not in the keyring"


class KeyVersionRetired(KeyringError):
    """A wrapped key names a root key version that was retired; re-wrap before retiring."""

    default_message = "root key version is retired"


class RetirementRefused(KeyringError):
    """Retiring that version would leave no usable root key (it is the current one)."""

    default_message = "the current root key version cannot be retired"


class InvalidKeyLength(KeyringError, ValueError):
    """The key given to ``wrap`` is not a 32-byte key."""

    default_message = "only 32-byte keys can be wrapped"
