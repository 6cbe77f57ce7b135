"""What every keyring backend promises (``phivault.crypto.keyring.base.Keyring``).

Runs against the local keyring, PKCS#11 on SoftHSM2 and OpenBao's transit engine alike.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets
from datetime import UTC, datetime, timedelta

import pytest

from phivault.crypto.keyring import (
    InvalidKeyLength,
    Keyring,
    KeyUnwrapError,
    KeyVersionRetired,
    RetirementRefused,
    UnknownRootKey,
    WrappedKey,
)
from servers.keyrings import KeyringBackend

AAD = b"institution:7f1c"


def _flip(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


def test_wrapped_key_unwraps_to_the_original(keyring: Keyring) -> None:
    institution_key = secrets.token_bytes(32)

    wrapped = keyring.wrap(institution_key, aad=AAD)

    assert wrapped.key_id == keyring.key_id
    assert wrapped.version == 1
    assert keyring.unwrap(wrapped, aad=AAD) == institution_key


def test_wrapped_key_unwraps_in_a_keyring_opened_again(keyring_backend: KeyringBackend) -> None:
    institution_key = secrets.token_bytes(32)
    stored = keyring_backend.open().wrap(institution_key, aad=AAD).to_bytes()

    again = keyring_backend.open()

    assert again.unwrap(WrappedKey.from_bytes(stored), aad=AAD) == institution_key


def test_each_wrap_of_the_same_key_differs(keyring: Keyring) -> None:
    institution_key = secrets.token_bytes(32)

    first = keyring.wrap(institution_key, aad=AAD)
    second = keyring.wrap(institution_key, aad=AAD)

    assert first.ciphertext != second.ciphertext


def test_unwrap_with_other_associated_data_fails_opaquely(keyring: Keyring) -> None:
    wrapped = keyring.wrap(secrets.token_bytes(32), aad=b"institution:1")

    for other in (b"institution:2", b"", b"institution:1\x00", AAD):
        with pytest.raises(KeyUnwrapError) as caught:
            keyring.unwrap(wrapped, aad=other)
        assert str(caught.value) == KeyUnwrapError.default_message


def test_tampered_or_truncated_ciphertext_fails_opaquely(keyring: Keyring) -> None:
    wrapped = keyring.wrap(secrets.token_bytes(32), aad=AAD)
    length = len(wrapped.ciphertext)
    damaged = [
        *(_flip(wrapped.ciphertext, index) for index in (0, 11, 12, length // 2, length - 1)),
        wrapped.ciphertext[:-1],
        wrapped.ciphertext + b"\x00",
        wrapped.ciphertext[:12],
    ]

    for ciphertext in damaged:
        with pytest.raises(KeyUnwrapError) as caught:
            keyring.unwrap(dataclasses.replace(wrapped, ciphertext=ciphertext), aad=AAD)
        assert str(caught.value) == KeyUnwrapError.default_message


def test_wrapped_bytes_never_contain_the_key(keyring: Keyring) -> None:
    for _ in range(20):
        institution_key = secrets.token_bytes(32)
        stored = keyring.wrap(institution_key, aad=AAD).to_bytes()

        for form in (institution_key, institution_key.hex().encode(), base64.b64encode(institution_key)):
            assert form[:16] not in stored
            assert form[-16:] not in stored


def test_only_32_byte_keys_are_wrapped(keyring: Keyring) -> None:
    for size in (0, 16, 31, 33, 64):
        with pytest.raises(InvalidKeyLength):
            keyring.wrap(b"k" * size, aad=AAD)


def test_new_version_wraps_new_keys_and_old_wraps_still_open(keyring: Keyring) -> None:
    old_key, new_key = secrets.token_bytes(32), secrets.token_bytes(32)
    wrapped_v1 = keyring.wrap(old_key, aad=AAD)

    created = keyring.create_version()
    wrapped_v2 = keyring.wrap(new_key, aad=AAD)

    assert created == 2
    assert keyring.current_version() == 2
    assert wrapped_v2.version == 2
    assert keyring.unwrap(wrapped_v1, aad=AAD) == old_key
    assert keyring.unwrap(wrapped_v2, aad=AAD) == new_key


def test_a_wrapped_key_relabelled_with_another_version_fails(keyring: Keyring) -> None:
    wrapped = keyring.wrap(secrets.token_bytes(32), aad=AAD)
    keyring.create_version()

    with pytest.raises(KeyUnwrapError):
        keyring.unwrap(dataclasses.replace(wrapped, version=2), aad=AAD)


def test_versions_lists_every_version_with_the_current_one_marked(keyring: Keyring) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    keyring.check()
    keyring.create_version()
    keyring.create_version()

    versions = keyring.versions()

    assert [v.version for v in versions] == [1, 2, 3]
    assert [v.current for v in versions] == [False, False, True]
    assert not any(v.retired for v in versions)
    for version in versions:
        assert version.created_at is not None
        assert before <= version.created_at <= datetime.now(UTC) + timedelta(seconds=5)


def test_retired_version_no_longer_unwraps(keyring: Keyring) -> None:
    wrapped_v1 = keyring.wrap(secrets.token_bytes(32), aad=AAD)
    keyring.create_version()
    rewrapped_key = secrets.token_bytes(32)
    wrapped_v2 = keyring.wrap(rewrapped_key, aad=AAD)

    keyring.retire(1)

    with pytest.raises(KeyVersionRetired, match="version 1 is retired"):
        keyring.unwrap(wrapped_v1, aad=AAD)
    assert keyring.unwrap(wrapped_v2, aad=AAD) == rewrapped_key
    assert [(v.version, v.retired, v.current) for v in keyring.versions()] == [
        (1, True, False),
        (2, False, True),
    ]


def test_retiring_a_version_retires_every_older_one(keyring: Keyring) -> None:
    wrapped_v1 = keyring.wrap(secrets.token_bytes(32), aad=AAD)
    keyring.create_version()
    keyring.create_version()

    keyring.retire(2)

    assert [v.retired for v in keyring.versions()] == [True, True, False]
    with pytest.raises(KeyVersionRetired):
        keyring.unwrap(wrapped_v1, aad=AAD)
    keyring.retire(1)  # already retired: nothing changes, nothing fails
    assert [v.retired for v in keyring.versions()] == [True, True, False]


def test_retiring_the_current_version_is_refused(keyring: Keyring) -> None:
    keyring.check()

    with pytest.raises(RetirementRefused):
        keyring.retire(1)
    keyring.create_version()
    with pytest.raises(RetirementRefused):
        keyring.retire(2)
    with pytest.raises(UnknownRootKey):
        keyring.retire(3)
    assert not any(v.retired for v in keyring.versions())


def test_retirement_is_seen_by_another_keyring_of_the_same_root_key(keyring_backend: KeyringBackend) -> None:
    first, second = keyring_backend.open(), keyring_backend.open()
    wrapped_v1 = first.wrap(secrets.token_bytes(32), aad=AAD)
    second.unwrap(wrapped_v1, aad=AAD)

    first.create_version()
    first.retire(1)

    assert second.current_version() == 2
    with pytest.raises(KeyVersionRetired):
        second.unwrap(wrapped_v1, aad=AAD)


def test_unknown_version_and_foreign_root_key_are_named(keyring: Keyring) -> None:
    wrapped = keyring.wrap(secrets.token_bytes(32), aad=AAD)

    with pytest.raises(UnknownRootKey):
        keyring.unwrap(dataclasses.replace(wrapped, version=9), aad=AAD)
    with pytest.raises(UnknownRootKey):
        keyring.unwrap(dataclasses.replace(wrapped, key_id="local-0000000000000000x"), aad=AAD)


def test_check_passes_and_describe_names_no_secret(keyring: Keyring, keyring_backend: KeyringBackend) -> None:
    keyring.check()

    description = keyring.describe()

    assert description
    for name in ("PHIVAULT_PKCS11_PIN", "PHIVAULT_OPENBAO_TOKEN"):
        secret = os.environ.get(name)
        if secret:
            assert secret not in description
    if keyring_backend.name == "local":
        assert keyring_backend.master_key_path.read_text().strip() not in description
