"""``open_keyring`` picks the backend from the URL and refuses URLs that carry secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from phivault.crypto.keyring import Keyring, KeyringConfigError, open_keyring
from phivault.crypto.keyring.openbao import OpenBaoKeyring
from phivault.crypto.keyring.pkcs11 import Pkcs11Keyring


def _open(url: str, tmp_path: Path) -> Keyring:
    return open_keyring(url, data_dir=tmp_path / "data", master_key_path=tmp_path / "master.key")


@pytest.mark.parametrize(
    "url",
    [
        "pkcs11:///usr/lib/softhsm/libsofthsm2.so?token=phivault&pin-value=1234",
        "pkcs11:///usr/lib/softhsm/libsofthsm2.so?token=phivault&pin=1234",
        "openbao://user:secret@bao.example:8200/transit/phivault",
        "openbao://bao.example:8200/transit/phivault?token=s.abcdef",
        "openbao+http://:hvs.abc@127.0.0.1:8200/transit/phivault",
    ],
)
def test_url_carrying_a_secret_is_refused_without_echoing_it(url: str, tmp_path: Path) -> None:
    with pytest.raises(KeyringConfigError, match="must not carry") as caught:
        _open(url, tmp_path)
    for secret in ("1234", "secret", "s.abcdef", "hvs.abc"):
        assert secret not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("vault://127.0.0.1/transit/k", "unknown keyring scheme"),
        ("local:///elsewhere/keyring.json", "just local://"),
        ("pkcs11:///usr/lib/softhsm/libsofthsm2.so", "needs \\?token="),
        ("pkcs11://host/usr/lib/libsofthsm2.so?token=x", "pkcs11:///absolute/path"),
        ("pkcs11:///usr/lib/softhsm/libsofthsm2.so?token=x&slot=1", "unknown keyring URL parameter 'slot'"),
        ("pkcs11:///usr/lib/softhsm/libsofthsm2.so?token=x&label=a b", "key label"),
        ("openbao://bao.example:8200/phivault", "openbao://HOST"),
        ("openbao+http://10.0.0.5:8200/transit/phivault", "loopback"),
        ("openbao://bao.example/transit/k?timeout=0", "timeout"),
        ("openbao://bao.example/transit/k?ca=/a&ca=/b", "given twice"),
        ("openbao://bao.example:99999/transit/k", "malformed"),
    ],
)
def test_malformed_url_is_refused_with_a_reason(url: str, reason: str, tmp_path: Path) -> None:
    with pytest.raises(KeyringConfigError, match=reason):
        _open(url, tmp_path)


def test_pkcs11_url_names_module_token_and_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIVAULT_PKCS11_PIN", "9876")

    keyring = _open("pkcs11:///opt/hsm/lib.so?token=prod&label=clinic-root", tmp_path)

    assert isinstance(keyring, Pkcs11Keyring)
    assert keyring.key_id == "pkcs11:clinic-root"
    assert "/opt/hsm/lib.so" in keyring.describe()
    assert "'prod'" in keyring.describe()
    assert "9876" not in keyring.describe()


def test_openbao_url_is_https_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIVAULT_OPENBAO_TOKEN", "hvs.not-a-real-token")

    keyring = _open("openbao://bao.example/secrets/transit/phivault?ca=/etc/bao/ca.pem", tmp_path)

    assert isinstance(keyring, OpenBaoKeyring)
    assert keyring.key_id == "openbao:secrets/transit/phivault"
    assert "https://bao.example:8200" in keyring.describe()
    assert "hvs." not in keyring.describe()


def test_openbao_plain_http_is_accepted_on_loopback(tmp_path: Path) -> None:
    keyring = _open("openbao+http://[::1]:8201/transit/phivault", tmp_path)

    assert "http://[::1]:8201" in keyring.describe()
