"""Root keys in OpenBao's transit engine (or HashiCorp Vault's), through hvac.

URL: ``openbao://HOST[:8200]/MOUNT/KEY[?ca=/path/ca.pem&timeout=10&namespace=NS]`` speaks
HTTPS, verifying the server against the system's CAs or the ``ca`` file given;
``openbao+http://…`` speaks plain HTTP and is accepted for loopback addresses only (a dev
server). ``MOUNT`` may have several segments (``secrets/transit``); ``KEY`` is the last.
The token comes from ``PHIVAULT_OPENBAO_TOKEN`` (or ``BAO_TOKEN``), never from the URL;
hvac's own fall-backs (``VAULT_TOKEN``, ``~/.vault-token``) are not used.

The root key is a transit key of type ``aes256-gcm96``, created on first use with
``exportable=false`` and ``allow_plaintext_backup=false``; the keyring refuses a key whose
configuration says otherwise. Its versions are the transit key's versions: ``create_version``
is ``rotate``, ``retire(v)`` raises ``min_decryption_version`` to ``v + 1`` (and never
lowers it). ``wrap`` is ``encrypt`` with ``associated_data`` (AEAD additional data, which
OpenBao's transit engine supports for aes*-gcm96 keys since its fork from Vault 1.14);
the ``WrappedKey`` keeps the version and the raw ``nonce ‖ ciphertext ‖ tag`` from the
``vault:v<N>:<base64>`` string, which ``unwrap`` rebuilds. The associated data need not
repeat the version: transit opens ``vault:vN:…`` with version N's key only, so a
relabelled version fails GCM's tag check all the same.

A policy for phivault's token (KEY ``phivault`` on mount ``transit``)::

    path "transit/keys/phivault"        { capabilities = ["create", "read", "update"] }
    path "transit/keys/phivault/rotate" { capabilities = ["update"] }
    path "transit/keys/phivault/config" { capabilities = ["update"] }
    path "transit/encrypt/phivault"     { capabilities = ["update"] }
    path "transit/decrypt/phivault"     { capabilities = ["update"] }

Calls are serialised per keyring (one HTTP session); institution keys are unwrapped
rarely and cached above the keyring. Token renewal is the deployment's business (a
periodic token renewed by OpenBao Agent, say); an expired token shows as
``KeyringUnavailable`` from ``check()``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import hvac  # type: ignore[import-untyped]  # hvac ships no type information
from hvac import exceptions as bao_errors

from phivault.crypto.keyring.base import (
    WRAPPED_KEY_BYTES,
    RootKeyVersion,
    WrappedKey,
    bound_aad,
    check_plaintext_key,
    check_retirement,
    split_keyring_url,
    url_parameters,
)
from phivault.crypto.keyring.errors import (
    KeyringConfigError,
    KeyringUnavailable,
    KeyUnwrapError,
    KeyVersionRetired,
    UnknownRootKey,
)

TOKEN_ENVS = ("PHIVAULT_OPENBAO_TOKEN", "BAO_TOKEN")
KEY_TYPE = "aes256-gcm96"
DEFAULT_PORT = 8200
DEFAULT_TIMEOUT = 10.0

_PARAMETERS = frozenset({"ca", "timeout", "namespace"})
_CIPHERTEXT_PREFIX = "vault:v"
# The version goes into the associated data of local and pkcs11 wraps; transit binds it
# itself (module docstring), so the bound data here carries a fixed 0 in its place.
_TRANSIT_BINDS_VERSION = 0

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _TransitKey:
    latest_version: int
    min_decryption_version: int
    created: dict[int, datetime]


class OpenBaoKeyring:
    """Root key versions as versions of one OpenBao transit key."""

    def __init__(
        self,
        *,
        address: str,
        mount: str,
        key_name: str,
        token: str | None,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        namespace: str | None = None,
    ) -> None:
        self._address = address
        self._mount = mount
        self._key_name = key_name
        self._token = token
        self._ca_file = ca_file
        self._timeout = timeout
        self._namespace = namespace
        self._lock = threading.RLock()
        self._client: hvac.Client | None = None
        self._key_checked = False

    @classmethod
    def from_url(cls, url: str) -> OpenBaoKeyring:
        parts = split_keyring_url(url, secret_parameters=frozenset({"token", "x-vault-token"}))
        scheme = parts.scheme.lower()
        segments = [segment for segment in parts.path.split("/") if segment]
        if not parts.hostname or len(segments) < 2 or parts.fragment:  # noqa: PLR2004 - mount and key
            raise KeyringConfigError("openbao keyring URL: openbao://HOST[:PORT]/MOUNT/KEY[?ca=FILE]")
        parameters = url_parameters(parts, _PARAMETERS)
        host = parts.hostname
        if scheme == "openbao+http":
            if not _is_loopback(host):
                raise KeyringConfigError(
                    "openbao+http:// is for a dev server on loopback; use openbao:// (HTTPS)"
                )
            if "ca" in parameters:
                raise KeyringConfigError("a CA file makes no sense over openbao+http://")
        try:
            timeout = float(parameters.get("timeout", DEFAULT_TIMEOUT))
        except ValueError:
            raise KeyringConfigError("openbao keyring URL: timeout must be a number of seconds") from None
        if not 0 < timeout <= 300:  # noqa: PLR2004 - five minutes is already absurd for a key server
            raise KeyringConfigError("openbao keyring URL: timeout must be between 0 and 300 seconds")
        http = "http" if scheme == "openbao+http" else "https"
        bracketed = f"[{host}]" if ":" in host else host
        ca = parameters.get("ca")
        return cls(
            address=f"{http}://{bracketed}:{parts.port or DEFAULT_PORT}",
            mount="/".join(segments[:-1]),
            key_name=segments[-1],
            token=next((os.environ[name] for name in TOKEN_ENVS if os.environ.get(name)), None),
            ca_file=Path(ca) if ca else None,
            timeout=timeout,
            namespace=parameters.get("namespace") or None,
        )

    @property
    def key_id(self) -> str:
        return f"openbao:{self._mount}/{self._key_name}"

    def describe(self) -> str:
        namespace = f" (namespace {self._namespace})" if self._namespace else ""
        return (
            f"OpenBao transit key {self._key_name!r} on mount {self._mount!r} at {self._address}{namespace}"
        )

    def wrap(self, plaintext_key: bytes, *, aad: bytes) -> WrappedKey:
        check_plaintext_key(plaintext_key)
        self._ensure_key()
        response = self._call(
            "encrypt",
            lambda client: client.secrets.transit.encrypt_data(
                self._key_name,
                plaintext=_b64(plaintext_key),
                associated_data=_b64(bound_aad(self.key_id, _TRANSIT_BINDS_VERSION, aad)),
                mount_point=self._mount,
            ),
        )
        version, ciphertext = _parse_ciphertext(_data(response).get("ciphertext"))
        return WrappedKey(key_id=self.key_id, version=version, ciphertext=ciphertext)

    def unwrap(self, wrapped: WrappedKey, *, aad: bytes) -> bytes:
        if wrapped.key_id != self.key_id:
            raise UnknownRootKey(
                f"wrapped under root key {wrapped.key_id!r}; this keyring holds {self.key_id!r}"
            )
        self._ensure_key()
        ciphertext = f"{_CIPHERTEXT_PREFIX}{wrapped.version}:{_b64(wrapped.ciphertext)}"
        try:
            response = self._call(
                "decrypt",
                lambda client: client.secrets.transit.decrypt_data(
                    self._key_name,
                    ciphertext=ciphertext,
                    associated_data=_b64(bound_aad(self.key_id, _TRANSIT_BINDS_VERSION, aad)),
                    mount_point=self._mount,
                ),
                passthrough=(bao_errors.InvalidRequest,),
            )
        except bao_errors.InvalidRequest:
            self._explain_refused_decrypt(wrapped.version)
            raise KeyUnwrapError from None
        try:
            plaintext = base64.b64decode(str(_data(response).get("plaintext")), validate=True)
        except (binascii.Error, ValueError):
            raise KeyUnwrapError from None
        if len(plaintext) != WRAPPED_KEY_BYTES:
            raise KeyUnwrapError from None
        return plaintext

    def create_version(self) -> int:
        self._ensure_key()
        response = self._call(
            "rotate",
            lambda client: client.secrets.transit.rotate_key(self._key_name, mount_point=self._mount),
        )
        if isinstance(response, dict) and "data" in response:
            return _parse_transit_key(response).latest_version
        return self._read_key().latest_version  # servers that answer 204 to a rotation

    def current_version(self) -> int:
        return self._read_key().latest_version

    def versions(self) -> list[RootKeyVersion]:
        key = self._read_key()
        return [
            RootKeyVersion(
                version=version,
                created_at=key.created.get(version),
                current=version == key.latest_version,
                retired=version < key.min_decryption_version,
            )
            for version in range(1, key.latest_version + 1)
        ]

    def retire(self, version: int) -> None:
        key = self._read_key()
        check_retirement(version, key.latest_version)
        if version + 1 <= key.min_decryption_version:
            return  # already retired; lowering min_decryption_version would un-retire others
        self._call(
            "retire",
            lambda client: client.secrets.transit.update_key_configuration(
                self._key_name, min_decryption_version=version + 1, mount_point=self._mount
            ),
        )

    def check(self) -> None:
        status = _dict(self._call("read seal status", lambda client: client.sys.read_seal_status()))
        if status.get("sealed") is not False:
            raise KeyringUnavailable(f"OpenBao at {self._address} is sealed: unseal it first")
        self._call("look up its token", lambda client: client.auth.token.lookup_self())
        self._key_checked = False  # check the key's configuration again, now
        probe = secrets.token_bytes(WRAPPED_KEY_BYTES)
        aad = b"phivault keyring check"
        if self.unwrap(self.wrap(probe, aad=aad), aad=aad) != probe:
            raise KeyringUnavailable(f"{self.describe()}: wrap/unwrap self-test failed")

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.adapter.close()

    # --- the server -----------------------------------------------------------------

    def _ensure_key(self) -> None:
        """Create the transit key on first use; refuse one that could let the root key out."""
        if self._key_checked:
            return
        try:
            self._read_key(passthrough=(bao_errors.InvalidPath,))
        except bao_errors.InvalidPath:
            self._call(
                "create the transit key",
                lambda client: client.secrets.transit.create_key(
                    self._key_name,
                    key_type=KEY_TYPE,
                    exportable=False,
                    allow_plaintext_backup=False,
                    mount_point=self._mount,
                ),
            )
            self._read_key()
        self._key_checked = True

    def _read_key(self, passthrough: tuple[type[Exception], ...] = ()) -> _TransitKey:
        response = self._call(
            "read the transit key",
            lambda client: client.secrets.transit.read_key(self._key_name, mount_point=self._mount),
            passthrough=passthrough,
        )
        data = _data(response)
        unsafe = [
            setting
            for setting, wanted in (
                ("type", KEY_TYPE),
                ("exportable", False),
                ("allow_plaintext_backup", False),
                ("derived", False),
            )
            if data.get(setting) != wanted
        ]
        if unsafe:
            raise KeyringUnavailable(
                f"{self.describe()} has unsafe or unexpected settings ({', '.join(unsafe)}); phivault "
                f"needs a non-exportable, non-derived {KEY_TYPE} key"
            )
        return _parse_transit_key(response)

    def _explain_refused_decrypt(self, version: int) -> None:
        """After transit refused a decryption: say so if the version was retired or never made."""
        key = self._read_key()
        if version < key.min_decryption_version:
            raise KeyVersionRetired(f"root key version {version} is retired")
        if version > key.latest_version:
            raise UnknownRootKey(f"root key version {version} does not exist")

    def _call(
        self,
        what: str,
        request: Callable[[hvac.Client], _T],
        *,
        passthrough: tuple[type[Exception], ...] = (),
    ) -> _T:
        """Run one request, turning transport and server failures into ``KeyringUnavailable``."""
        where = f"OpenBao at {self._address}"
        with self._lock, self._translated_errors(what, where, passthrough):
            return request(self._connected())

    @contextlib.contextmanager
    def _translated_errors(
        self, what: str, where: str, passthrough: tuple[type[Exception], ...]
    ) -> Iterator[None]:
        try:
            yield
        except passthrough:
            raise
        except OSError as exc:  # requests' ConnectionError and Timeout are OSErrors
            raise KeyringUnavailable(f"cannot reach {where} to {what}: {type(exc).__name__}") from None
        except (bao_errors.Forbidden, bao_errors.Unauthorized):
            raise KeyringUnavailable(
                f"{where} refused the token to {what} (permission denied): "
                f"check {TOKEN_ENVS[0]} and the token's policy"
            ) from None
        except bao_errors.VaultDown:
            raise KeyringUnavailable(f"{where} is sealed or unavailable: cannot {what}") from None
        except bao_errors.VaultNotInitialized:
            raise KeyringUnavailable(f"{where} is not initialised") from None
        except bao_errors.InvalidPath:
            raise KeyringUnavailable(f"{where}: nothing at the path to {what}; is the mount right?") from None
        except bao_errors.VaultError as exc:
            raise KeyringUnavailable(f"{where} failed to {what}: {type(exc).__name__}") from None

    def _connected(self) -> hvac.Client:
        if self._token is None:
            names = " or ".join(TOKEN_ENVS)
            raise KeyringUnavailable(f"no OpenBao token: set {names}")
        if self._client is None:
            # Every argument explicit, so hvac reads no VAULT_* variable or ~/.vault-token.
            self._client = hvac.Client(
                url=self._address,
                token=self._token,
                verify=str(self._ca_file) if self._ca_file else True,
                timeout=self._timeout,
                namespace=self._namespace,
            )
        return self._client


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _dict(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise KeyringUnavailable("OpenBao answered with something other than a JSON object")
    return {str(key): item for key, item in value.items()}


def _data(response: object) -> dict[str, object]:
    return _dict(_dict(response).get("data"))


def _parse_ciphertext(value: object) -> tuple[int, bytes]:
    """Split transit's ``vault:v<N>:<base64>`` into N and the raw bytes."""
    unknown = KeyringUnavailable("OpenBao returned a ciphertext in an unknown format")
    if not isinstance(value, str) or not value.startswith(_CIPHERTEXT_PREFIX):
        raise unknown
    version_text, _, encoded = value.removeprefix(_CIPHERTEXT_PREFIX).partition(":")
    try:
        return int(version_text), base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        raise unknown from None


def _parse_transit_key(response: object) -> _TransitKey:
    data = _data(response)
    latest = data.get("latest_version")
    minimum = data.get("min_decryption_version")
    created = _dict(data.get("keys"))
    if not isinstance(latest, int) or not isinstance(minimum, int):
        raise KeyringUnavailable("OpenBao returned a transit key without version numbers")
    dates: dict[int, datetime] = {}
    for version, value in created.items():
        # Symmetric keys report their creation as Unix seconds.
        if version.isdigit() and isinstance(value, int):
            dates[int(version)] = datetime.fromtimestamp(value, tz=UTC)
    return _TransitKey(latest_version=latest, min_decryption_version=max(minimum, 1), created=dates)
