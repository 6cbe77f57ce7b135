"""The PKCS#11 keyring on a SoftHSM2 token: root keys stay in the token, failures say why."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import AttributeSensitive

from phivault.crypto.keyring import KeyringUnavailable, KeyVersionRetired, open_keyring
from phivault.crypto.keyring.pkcs11 import Pkcs11Keyring
from servers.softhsm import MODULE_PATH, SoftHsmToken

pytestmark = pytest.mark.hsm

AAD = b"institution:1"


@pytest.fixture
def key_label() -> str:
    return f"root-{secrets.token_hex(4)}"


def _keyring(
    token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, url: str, pin: str | None
) -> Pkcs11Keyring:
    if pin is None:
        monkeypatch.delenv("PHIVAULT_PKCS11_PIN", raising=False)
    else:
        monkeypatch.setenv("PHIVAULT_PKCS11_PIN", pin)
    keyring = open_keyring(url, data_dir=tmp_path / "data", master_key_path=tmp_path / "unused.key")
    assert isinstance(keyring, Pkcs11Keyring)
    del token
    return keyring


@contextmanager
def _token_session(token: SoftHsmToken, *, rw: bool = False) -> Iterator[pkcs11.Session]:
    """Our own look into the token, as an auditor (or an intruder) with the PIN would take it."""
    library = pkcs11.lib(str(token.module_path))
    with library.get_token(token_label=token.label).open(rw=rw, user_pin=token.pin) as session:
        yield session


def _root_key_objects(token: SoftHsmToken, key_label: str) -> dict[str, dict[Attribute, object]]:
    wanted = [
        Attribute.TOKEN,
        Attribute.SENSITIVE,
        Attribute.EXTRACTABLE,
        Attribute.ALWAYS_SENSITIVE,
        Attribute.NEVER_EXTRACTABLE,
        Attribute.LOCAL,
        Attribute.WRAP,
        Attribute.UNWRAP,
        Attribute.ENCRYPT,
        Attribute.DECRYPT,
        Attribute.VALUE_LEN,
    ]
    found: dict[str, dict[Attribute, object]] = {}
    with _token_session(token) as session:
        for item in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            label = item[Attribute.LABEL]
            if isinstance(label, str) and label.startswith(key_label + "-v"):
                found[label] = item.get_attributes(wanted)
                with pytest.raises(AttributeSensitive):
                    item[Attribute.VALUE]
    return found


def test_root_keys_are_generated_in_the_token_and_never_leave_it(
    softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_label: str
) -> None:
    keyring = _keyring(
        softhsm_token, tmp_path, monkeypatch, url=softhsm_token.keyring_url(key_label), pin=softhsm_token.pin
    )
    keyring.check()
    keyring.create_version()

    objects = _root_key_objects(softhsm_token, key_label)

    assert sorted(objects) == [f"{key_label}-v1", f"{key_label}-v2"]
    for attributes in objects.values():
        assert attributes[Attribute.TOKEN] is True
        assert attributes[Attribute.SENSITIVE] is True
        assert attributes[Attribute.EXTRACTABLE] is False
        assert attributes[Attribute.ALWAYS_SENSITIVE] is True
        assert attributes[Attribute.NEVER_EXTRACTABLE] is True
        assert attributes[Attribute.LOCAL] is True
        assert attributes[Attribute.WRAP] is False
        assert attributes[Attribute.UNWRAP] is False
        assert attributes[Attribute.VALUE_LEN] == 32


def test_retired_root_key_is_refused_by_the_token_itself(
    softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_label: str
) -> None:
    keyring = _keyring(
        softhsm_token, tmp_path, monkeypatch, url=softhsm_token.keyring_url(key_label), pin=softhsm_token.pin
    )
    wrapped = keyring.wrap(secrets.token_bytes(32), aad=AAD)
    keyring.create_version()

    keyring.retire(1)

    v1 = _root_key_objects(softhsm_token, key_label)[f"{key_label}-v1"]
    assert v1[Attribute.DECRYPT] is False
    assert v1[Attribute.ENCRYPT] is False
    with pytest.raises(KeyVersionRetired):
        keyring.unwrap(wrapped, aad=AAD)


def test_a_key_imported_under_the_root_key_label_is_refused(
    softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_label: str
) -> None:
    # Someone with the PIN plants a key whose value they know as the next version.
    keyring = _keyring(
        softhsm_token, tmp_path, monkeypatch, url=softhsm_token.keyring_url(key_label), pin=softhsm_token.pin
    )
    keyring.check()
    with _token_session(softhsm_token, rw=True) as session:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.LABEL: f"{key_label}-v2",
                Attribute.ID: b"2:0:planted",
                Attribute.VALUE: b"\x42" * 32,
            }
        )

    with pytest.raises(
        KeyringUnavailable, match=f"'{key_label}-v2' is not an AES-256 key generated in the token"
    ):
        keyring.wrap(secrets.token_bytes(32), aad=AAD)


def test_wrong_pin_makes_the_keyring_unavailable(
    softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_label: str
) -> None:
    keyring = _keyring(
        softhsm_token, tmp_path, monkeypatch, url=softhsm_token.keyring_url(key_label), pin="0000"
    )

    with pytest.raises(KeyringUnavailable, match="refused the PIN in PHIVAULT_PKCS11_PIN") as caught:
        keyring.check()
    assert softhsm_token.pin not in str(caught.value)


def test_missing_pin_is_named(
    softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_label: str
) -> None:
    keyring = _keyring(
        softhsm_token, tmp_path, monkeypatch, url=softhsm_token.keyring_url(key_label), pin=None
    )

    with pytest.raises(KeyringUnavailable, match="PHIVAULT_PKCS11_PIN is not set"):
        keyring.check()


def test_missing_token_makes_the_keyring_unavailable(
    softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"pkcs11://{MODULE_PATH}?token=no-such-token"
    keyring = _keyring(softhsm_token, tmp_path, monkeypatch, url=url, pin=softhsm_token.pin)

    with pytest.raises(KeyringUnavailable, match="no PKCS#11 token 'no-such-token'"):
        keyring.check()


def test_missing_module_makes_the_keyring_unavailable(
    softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"pkcs11://{tmp_path}/libabsent.so?token={softhsm_token.label}"
    keyring = _keyring(softhsm_token, tmp_path, monkeypatch, url=url, pin=softhsm_token.pin)

    with pytest.raises(KeyringUnavailable, match=r"libabsent\.so does not exist"):
        keyring.check()


def test_a_file_that_is_no_pkcs11_module_makes_the_keyring_unavailable(
    softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"not an ELF file")
    keyring = _keyring(
        softhsm_token, tmp_path, monkeypatch, url=f"pkcs11://{fake}?token={softhsm_token.label}", pin="x"
    )

    with pytest.raises(KeyringUnavailable, match="cannot load PKCS#11 module"):
        keyring.check()


def test_keyrings_on_many_threads_share_the_token(
    softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_label: str
) -> None:
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - only this test

    url = softhsm_token.keyring_url(key_label)
    keyrings = [
        _keyring(softhsm_token, tmp_path, monkeypatch, url=url, pin=softhsm_token.pin) for _ in range(4)
    ]
    keys = [secrets.token_bytes(32) for _ in range(40)]

    def round_trip(index: int) -> bool:
        keyring = keyrings[index % len(keyrings)]
        return keyring.unwrap(keyring.wrap(keys[index], aad=AAD), aad=AAD) == keys[index]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(round_trip, range(len(keys))))

    assert all(results)
    assert [version.version for version in keyrings[0].versions()] == [1]
