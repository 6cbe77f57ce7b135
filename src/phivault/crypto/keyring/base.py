"""What every keyring offers, and the values that cross its boundary.

A keyring holds the **root key** (DESIGN §4) and never lets it out: callers hand it a
32-byte institution key and get back a ``WrappedKey`` they can store anywhere, and hand the
``WrappedKey`` back to get the institution key. Everything below the institution key
(patient keys, object DEKs) is wrapped in software by ``phivault.crypto``, not here.

Versions. The root key rotates: ``create_version`` makes a new version current, ``wrap``
always uses the current one, and ``unwrap`` uses the version the ``WrappedKey`` names, so
rotation re-wraps institution keys at leisure and encrypts no data again. ``retire(v)``
then makes version ``v`` *and every older one* unusable: that is the only retirement
OpenBao's transit engine can express (``min_decryption_version``), the re-wrap job moves
every key off all old versions at once, and one meaning across backends is simpler.

Associated data. ``wrap`` and ``unwrap`` take ``aad`` naming what the key belongs to (the
institution id, say): a wrapped key copied onto another row fails to unwrap there. The
backends also bind the root key id and version, so a relabelled ``WrappedKey`` fails too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from urllib.parse import SplitResult, parse_qsl, urlsplit

from phivault.crypto.keyring.errors import (
    InvalidKeyLength,
    KeyringConfigError,
    KeyUnwrapError,
    RetirementRefused,
    UnknownRootKey,
)

WRAPPED_KEY_BYTES = 32
"""The keyring wraps institution keys: AES-256 keys, 32 bytes, nothing else."""

MAX_VERSION = 2**32 - 1
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/@-]{1,200}")

_ENCODING_VERSION = 1
_AAD_DOMAIN = b"phivault keyring wrap v1\x00"


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """An institution key wrapped by version ``version`` of root key ``key_id``.

    Nothing in it is secret. ``ciphertext`` is backend-specific (nonce, ciphertext and
    tag for AES-GCM); store the whole value, e.g. as ``to_bytes()``.
    """

    key_id: str
    version: int
    ciphertext: bytes

    def to_bytes(self) -> bytes:
        """One self-describing byte string: 0x01, key id (length-prefixed), version, ciphertext."""
        key_id = self.key_id.encode("ascii")
        if not KEY_ID_PATTERN.fullmatch(self.key_id) or not 1 <= self.version <= MAX_VERSION:
            msg = "wrapped key has an invalid key id or version"
            raise ValueError(msg)
        return (
            bytes([_ENCODING_VERSION, len(key_id)])
            + key_id
            + self.version.to_bytes(4, "big")
            + self.ciphertext
        )

    @classmethod
    def from_bytes(cls, encoded: bytes) -> WrappedKey:
        """Parse ``to_bytes()`` output; anything malformed is a ``KeyUnwrapError``."""
        if len(encoded) < 2 or encoded[0] != _ENCODING_VERSION:  # noqa: PLR2004 - two header bytes
            raise KeyUnwrapError from None
        end = 2 + encoded[1]
        try:
            key_id = encoded[2:end].decode("ascii")
        except UnicodeDecodeError:
            raise KeyUnwrapError from None
        version = int.from_bytes(encoded[end : end + 4], "big")
        ciphertext = encoded[end + 4 :]
        if not KEY_ID_PATTERN.fullmatch(key_id) or version < 1 or not ciphertext:
            raise KeyUnwrapError from None
        return cls(key_id=key_id, version=version, ciphertext=ciphertext)


@dataclass(frozen=True, slots=True)
class RootKeyVersion:
    """One version of the root key, as ``phivault keys status`` shows it.

    ``created_at`` is ``None`` where the backend no longer reports it (OpenBao forgets the
    dates of versions below ``min_decryption_version``).
    """

    version: int
    created_at: datetime | None
    current: bool
    retired: bool


class Keyring(Protocol):
    """A place that holds root keys and wraps institution keys under them."""

    @property
    def key_id(self) -> str:
        """The root key's name, the same for all its versions; ``WrappedKey.key_id``."""
        ...

    def wrap(self, plaintext_key: bytes, *, aad: bytes) -> WrappedKey:
        """Wrap a 32-byte key under the current root key version, bound to ``aad``."""
        ...

    def unwrap(self, wrapped: WrappedKey, *, aad: bytes) -> bytes:
        """Return the key; else ``KeyUnwrapError`` (opaque), ``KeyVersionRetired`` or ``UnknownRootKey``."""
        ...

    def create_version(self) -> int:
        """Make a new root key version and make it current; return its number."""
        ...

    def current_version(self) -> int:
        """The version ``wrap`` uses now."""
        ...

    def versions(self) -> list[RootKeyVersion]:
        """Every version, oldest first."""
        ...

    def retire(self, version: int) -> None:
        """Make ``version`` and every older version unusable; the current one is refused."""
        ...

    def check(self) -> None:
        """Raise ``KeyringUnavailable`` saying what to fix unless wrap and unwrap would work.

        Creates root key version 1 on first use, like every other operation.
        """
        ...

    def describe(self) -> str:
        """Where the root key lives, for logs and ``keys status``; never a secret."""
        ...

    def close(self) -> None:
        """Release connections; the keyring may not be used afterwards."""
        ...


def check_plaintext_key(plaintext_key: bytes) -> None:
    if len(plaintext_key) != WRAPPED_KEY_BYTES:
        raise InvalidKeyLength


def bound_aad(key_id: str, version: int, aad: bytes) -> bytes:
    """The associated data every backend authenticates: root key id and version, then ``aad``.

    Every field before ``aad`` has a fixed or prefixed length, so no two different
    (key id, version, aad) triples give the same bytes.
    """
    encoded_id = key_id.encode("ascii")
    return _AAD_DOMAIN + len(encoded_id).to_bytes(2, "big") + encoded_id + version.to_bytes(4, "big") + aad


def check_retirement(version: int, current: int) -> None:
    """Shared argument check of ``retire``: an existing, non-current version."""
    if version >= current:
        if version == current:
            raise RetirementRefused(f"root key version {version} is current; create a new version first")
        raise UnknownRootKey(f"root key version {version} does not exist (current is {current})")
    if version < 1:
        raise UnknownRootKey(f"root key version {version} does not exist")


_SECRET_PARAMETERS = frozenset({"pin", "pin-value", "pin-source", "so-pin", "password", "secret"})


def split_keyring_url(url: str, *, secret_parameters: frozenset[str] = frozenset()) -> SplitResult:
    """``urlsplit``, refusing credentials in the URL; for the backends' parsers.

    ``secret_parameters`` adds query parameter names that are secrets for one backend
    (``token`` is OpenBao's token but PKCS#11's token *label*).
    """
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
        has_user = parts.username is not None
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise KeyringConfigError(f"malformed keyring URL: {exc}") from None
    if has_password or has_user:
        raise KeyringConfigError("the keyring URL must not carry credentials; use the environment")
    for field in parts.query.split("&"):
        name = field.partition("=")[0].lower()
        if name in _SECRET_PARAMETERS | secret_parameters:
            raise KeyringConfigError(f"the keyring URL must not carry {name!r}; use the environment")
    return parts


def url_parameters(parts: SplitResult, allowed: frozenset[str]) -> dict[str, str]:
    """The query of a keyring URL as a dict; unknown or repeated parameters are refused."""
    found: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise KeyringConfigError(f"unknown keyring URL parameter {name!r} (known: {known})")
        if name in found:
            raise KeyringConfigError(f"keyring URL parameter {name!r} given twice")
        found[name] = value
    return found
