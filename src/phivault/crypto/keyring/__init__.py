"""Keyrings: where phivault's root keys live, chosen by ``PHIVAULT_KEYRING_URL`` (DESIGN §4).

- ``local://`` (default): a file in the data directory sealed by the master key file.
- ``pkcs11:///path/to/module.so?token=LABEL[&label=phivault-root]``: AES keys generated
  inside a PKCS#11 token (an HSM; tested with SoftHSM2); PIN from ``PHIVAULT_PKCS11_PIN``.
- ``openbao://host:8200/MOUNT/KEY[?ca=/path/ca.pem]`` (HTTPS) or ``openbao+http://…``
  (plain HTTP, loopback only, for development): OpenBao's transit engine; token from
  ``PHIVAULT_OPENBAO_TOKEN`` (or ``BAO_TOKEN``).

Secrets never go in the URL: one with a password, PIN or token in it is refused, because
URLs end up in logs and ``doctor`` output. The pkcs11 and openbao backends import their
client libraries only when chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from phivault.clock import Clock
from phivault.crypto.keyring.base import Keyring, RootKeyVersion, WrappedKey, split_keyring_url
from phivault.crypto.keyring.errors import (
    InvalidKeyLength,
    KeyringConfigError,
    KeyringError,
    KeyringUnavailable,
    KeyUnwrapError,
    KeyVersionRetired,
    RetirementRefused,
    UnknownRootKey,
)
from phivault.crypto.keyring.local import LocalKeyring

__all__ = [
    "InvalidKeyLength",
    "KeyUnwrapError",
    "KeyVersionRetired",
    "Keyring",
    "KeyringConfigError",
    "KeyringError",
    "KeyringUnavailable",
    "LocalKeyring",
    "RetirementRefused",
    "RootKeyVersion",
    "UnknownRootKey",
    "WrappedKey",
    "open_keyring",
]

_Opener = Callable[[str, Path, Path, Clock | None], Keyring]


def open_keyring(url: str, *, data_dir: Path, master_key_path: Path, clock: Clock | None = None) -> Keyring:
    """Return the keyring ``url`` names; nothing is contacted until it is first used.

    Raises ``KeyringConfigError`` for a malformed URL. Call ``check()`` on the result to
    learn, as a ``KeyringUnavailable`` with a message for the operator, whether it works.
    """
    scheme = url.partition(":")[0].lower()
    opener = _OPENERS.get(scheme)
    if opener is None:
        known = ", ".join(f"{name}://" for name in _OPENERS)
        raise KeyringConfigError(f"unknown keyring scheme {scheme!r}: use one of {known}")
    return opener(url, data_dir, master_key_path, clock)


def _open_local(url: str, data_dir: Path, master_key_path: Path, clock: Clock | None) -> Keyring:
    parts = split_keyring_url(url)
    if parts.netloc or parts.path or parts.query or parts.fragment:
        raise KeyringConfigError(
            "the local keyring URL is just local:// (the file lives in the data directory)"
        )
    return LocalKeyring(data_dir=data_dir, master_key_path=master_key_path, clock=clock)


def _open_pkcs11(url: str, data_dir: Path, master_key_path: Path, clock: Clock | None) -> Keyring:
    del master_key_path  # the root keys live in the token
    from phivault.crypto.keyring.pkcs11 import Pkcs11Keyring  # noqa: PLC0415 - optional dependency

    return Pkcs11Keyring.from_url(url, data_dir=data_dir, clock=clock)


def _open_openbao(url: str, data_dir: Path, master_key_path: Path, clock: Clock | None) -> Keyring:
    del data_dir, master_key_path, clock  # OpenBao keeps and dates the versions itself
    from phivault.crypto.keyring.openbao import OpenBaoKeyring  # noqa: PLC0415 - optional dependency

    return OpenBaoKeyring.from_url(url)


_OPENERS: dict[str, _Opener] = {
    "local": _open_local,
    "pkcs11": _open_pkcs11,
    "openbao": _open_openbao,
    "openbao+http": _open_openbao,
}
