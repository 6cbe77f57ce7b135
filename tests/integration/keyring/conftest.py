"""Keyring backends for the contract tests: local (always), PKCS#11 on SoftHSM2, OpenBao.

Each ``KeyringBackend`` opens keyrings that share one root key, so a test can close a
keyring and open it again. Every test gets a root key of its own (a fresh data directory,
token label prefix or transit key), so tests do not see each other's versions.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from phivault.crypto.keyring import Keyring
from phivault.crypto.master_key import generate_master_key_file
from servers.common import unavailable
from servers.keyrings import KeyringBackend
from servers.openbao import OpenBaoServer, OpenBaoUnavailableError, start_openbao_dev
from servers.softhsm import SoftHsm, SoftHsmToken, SoftHsmUnavailableError


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    """One SoftHSM2 token for the session; SOFTHSM2_CONF points at its directory meanwhile."""
    try:
        softhsm = SoftHsm(tmp_path_factory.mktemp("softhsm"))
        token = softhsm.add_token("phivault-test")
    except SoftHsmUnavailableError as exc:
        unavailable(f"SoftHSM2: {exc}")
        raise  # unreachable: unavailable() skips or fails
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ.update(token.env())
    yield token
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def openbao_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    """One OpenBao dev server over HTTPS (its own CA) for the session."""
    try:
        server = start_openbao_dev(tmp_path_factory.mktemp("openbao"), tls=True)
    except OpenBaoUnavailableError as exc:
        unavailable(f"OpenBao: {exc}")
        raise  # unreachable: unavailable() skips or fails
    yield server
    server.stop()


def _local(request: pytest.FixtureRequest, directory: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    del request, monkeypatch
    generate_master_key_file(directory / "secrets" / "master.key")
    return "local://"


def _pkcs11(request: pytest.FixtureRequest, directory: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    del directory
    token: SoftHsmToken = request.getfixturevalue("softhsm_token")
    monkeypatch.setenv("PHIVAULT_PKCS11_PIN", token.pin)
    return token.keyring_url(key_label=f"root-{secrets.token_hex(4)}")


def _openbao(request: pytest.FixtureRequest, directory: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    del directory
    server: OpenBaoServer = request.getfixturevalue("openbao_server")
    monkeypatch.setenv("PHIVAULT_OPENBAO_TOKEN", server.token)
    monkeypatch.delenv("BAO_TOKEN", raising=False)
    return server.keyring_url(f"root-{secrets.token_hex(4)}")


_URLS: dict[str, Callable[[pytest.FixtureRequest, Path, pytest.MonkeyPatch], str]] = {
    "local": _local,
    "pkcs11": _pkcs11,
    "openbao": _openbao,
}


@pytest.fixture(
    params=[
        "local",
        pytest.param("pkcs11", marks=pytest.mark.hsm),
        pytest.param("openbao", marks=pytest.mark.openbao),
    ]
)
def keyring_backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[KeyringBackend]:
    name: str = request.param
    data_dir = tmp_path / "data"
    url = _URLS[name](request, tmp_path, monkeypatch)
    backend = KeyringBackend(
        name=name, url=url, data_dir=data_dir, master_key_path=tmp_path / "secrets" / "master.key"
    )
    yield backend
    backend.close_all()


@pytest.fixture
def keyring(keyring_backend: KeyringBackend) -> Keyring:
    return keyring_backend.open()
