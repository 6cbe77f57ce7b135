"""The OpenBao keyring against a real dev server: the transit key, its settings, and outages."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phivault.crypto.keyring import KeyringUnavailable, open_keyring
from phivault.crypto.keyring.openbao import OpenBaoKeyring
from servers.common import unavailable
from servers.openbao import OpenBaoServer, OpenBaoUnavailableError, start_openbao_dev

pytestmark = pytest.mark.openbao

AAD = b"institution:1"


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[OpenBaoServer]:
    """A server of this test's own (plain HTTP), free to be sealed or stopped."""
    try:
        server = start_openbao_dev(tmp_path / "bao")
    except OpenBaoUnavailableError as exc:
        unavailable(f"OpenBao: {exc}")
        raise  # unreachable: unavailable() skips or fails
    yield server
    server.stop()


def _keyring(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, token: str | None
) -> OpenBaoKeyring:
    monkeypatch.delenv("BAO_TOKEN", raising=False)
    if token is None:
        monkeypatch.delenv("PHIVAULT_OPENBAO_TOKEN", raising=False)
    else:
        monkeypatch.setenv("PHIVAULT_OPENBAO_TOKEN", token)
    keyring = open_keyring(url, data_dir=tmp_path / "data", master_key_path=tmp_path / "unused.key")
    assert isinstance(keyring, OpenBaoKeyring)
    return keyring


def _key_name() -> str:
    return f"root-{secrets.token_hex(4)}"


def test_the_dev_server_listens_on_loopback_only(plain_server: OpenBaoServer) -> None:
    addresses = plain_server.listening_addresses()

    assert addresses
    assert {address for address, _ in addresses} == {"127.0.0.1"}
    assert plain_server.port in {port for _, port in addresses}


def test_first_use_creates_a_non_exportable_aes_gcm_transit_key(
    openbao_server: OpenBaoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _key_name()
    keyring = _keyring(openbao_server.keyring_url(name), tmp_path, monkeypatch, token=openbao_server.token)

    keyring.check()

    key = openbao_server.client().secrets.transit.read_key(name, mount_point="transit")["data"]
    assert key["type"] == "aes256-gcm96"
    assert key["exportable"] is False
    assert key["allow_plaintext_backup"] is False
    assert key["latest_version"] == 1


def test_an_exportable_transit_key_is_refused(
    openbao_server: OpenBaoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _key_name()
    openbao_server.client().secrets.transit.create_key(
        name, key_type="aes256-gcm96", exportable=True, mount_point="transit"
    )
    keyring = _keyring(openbao_server.keyring_url(name), tmp_path, monkeypatch, token=openbao_server.token)

    with pytest.raises(KeyringUnavailable, match=r"unsafe or unexpected settings \(exportable\)"):
        keyring.check()


def test_plain_http_keyring_works_against_a_loopback_dev_server(
    plain_server: OpenBaoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring = _keyring(plain_server.keyring_url(_key_name()), tmp_path, monkeypatch, token=plain_server.token)
    institution_key = secrets.token_bytes(32)

    assert keyring.unwrap(keyring.wrap(institution_key, aad=AAD), aad=AAD) == institution_key


def test_stopped_server_makes_the_keyring_unavailable_quickly(
    plain_server: OpenBaoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring = _keyring(plain_server.keyring_url(_key_name()), tmp_path, monkeypatch, token=plain_server.token)
    wrapped = keyring.wrap(secrets.token_bytes(32), aad=AAD)
    plain_server.stop()

    started = time.monotonic()
    with pytest.raises(KeyringUnavailable, match=r"cannot reach OpenBao at http://127\.0\.0\.1"):
        keyring.check()
    with pytest.raises(KeyringUnavailable, match="cannot reach"):
        keyring.unwrap(wrapped, aad=AAD)

    assert time.monotonic() - started < 3


def test_sealed_server_makes_the_keyring_unavailable(
    plain_server: OpenBaoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring = _keyring(plain_server.keyring_url(_key_name()), tmp_path, monkeypatch, token=plain_server.token)
    keyring.check()
    plain_server.client().sys.seal()

    with pytest.raises(KeyringUnavailable, match="is sealed"):
        keyring.check()
    with pytest.raises(KeyringUnavailable, match="sealed or unavailable"):
        keyring.wrap(secrets.token_bytes(32), aad=AAD)


def test_bad_token_makes_the_keyring_unavailable(
    openbao_server: OpenBaoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad_token = "phivault-test-" + secrets.token_hex(16)
    keyring = _keyring(openbao_server.keyring_url(_key_name()), tmp_path, monkeypatch, token=bad_token)

    with pytest.raises(KeyringUnavailable, match="refused the token") as caught:
        keyring.check()
    assert bad_token not in str(caught.value)


def test_token_without_transit_rights_makes_the_keyring_unavailable(
    openbao_server: OpenBaoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limited = openbao_server.client().auth.token.create(policies=["default"], ttl="5m")["auth"][
        "client_token"
    ]
    keyring = _keyring(openbao_server.keyring_url(_key_name()), tmp_path, monkeypatch, token=limited)

    with pytest.raises(KeyringUnavailable, match="refused the token to read the transit key"):
        keyring.check()


def test_missing_token_is_named(
    openbao_server: OpenBaoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring = _keyring(openbao_server.keyring_url(_key_name()), tmp_path, monkeypatch, token=None)

    with pytest.raises(KeyringUnavailable, match="set PHIVAULT_OPENBAO_TOKEN or BAO_TOKEN"):
        keyring.check()


def test_server_certificate_from_another_ca_is_refused(
    openbao_server: OpenBaoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without ?ca= the system's CAs are used, and none of them signed the dev server's certificate.
    url = f"openbao://127.0.0.1:{openbao_server.port}/transit/{_key_name()}"
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    keyring = _keyring(url, tmp_path, monkeypatch, token=openbao_server.token)

    with pytest.raises(KeyringUnavailable, match=r"cannot reach .* SSLError"):
        keyring.check()


def test_unknown_mount_is_reported(
    openbao_server: OpenBaoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = openbao_server.keyring_url(_key_name(), mount="no-such-mount")
    keyring = _keyring(url, tmp_path, monkeypatch, token=openbao_server.token)

    with pytest.raises(KeyringUnavailable, match=r"nothing at the path .* is the mount right\?"):
        keyring.check()
