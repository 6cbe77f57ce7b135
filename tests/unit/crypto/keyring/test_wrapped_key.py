"""``WrappedKey`` survives storage as bytes, and malformed bytes fail opaquely."""

from __future__ import annotations

import pytest

from phivault.crypto.keyring import KeyUnwrapError, WrappedKey


def test_wrapped_key_round_trips_through_bytes() -> None:
    wrapped = WrappedKey(key_id="openbao:transit/phivault", version=70_000, ciphertext=b"\x00" * 60)

    assert WrappedKey.from_bytes(wrapped.to_bytes()) == wrapped


@pytest.mark.parametrize(
    "encoded",
    [
        b"",
        b"\x01",
        b"\x02\x03abc\x00\x00\x00\x01ct",  # unknown encoding version
        b"\x01\x03ab",  # key id cut short
        b"\x01\x03abc\x00\x00\x00\x01",  # no ciphertext
        b"\x01\x03abc\x00\x00\x00\x00ct",  # version 0
        b"\x01\x03a c\x00\x00\x00\x01ct",  # a space in the key id
        b"\x01\x02\xff\xfe\x00\x00\x00\x01ct",  # not ASCII
    ],
)
def test_malformed_wrapped_key_bytes_fail_opaquely(encoded: bytes) -> None:
    with pytest.raises(KeyUnwrapError) as caught:
        WrappedKey.from_bytes(encoded)
    assert str(caught.value) == KeyUnwrapError.default_message


def test_a_wrapped_key_with_an_invalid_key_id_cannot_be_stored() -> None:
    with pytest.raises(ValueError, match="invalid key id"):
        WrappedKey(key_id="has space", version=1, ciphertext=b"x").to_bytes()
