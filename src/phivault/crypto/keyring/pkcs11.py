"""Root keys inside a PKCS#11 token (an HSM), through python-pkcs11. Tested with SoftHSM2.

URL: ``pkcs11:///usr/lib/softhsm/libsofthsm2.so?token=phivault[&label=phivault-root]`` —
the module to load, the token's label, and the label prefix of the root key objects. The
user PIN comes from ``PHIVAULT_PKCS11_PIN``, never from the URL.

Root keys. Version ``N`` is the AES-256 secret key object labelled ``<label>-v<N>``,
generated inside the token (``C_GenerateKey``) as a token object with CKA_SENSITIVE=true,
CKA_EXTRACTABLE=false, CKA_PRIVATE=true, usable for CKA_ENCRYPT/CKA_DECRYPT only (no wrap,
sign or derive). Its CKA_ID is ``<N>:<unix time of creation>:<random>``. Before using an
object the keyring checks that the token generated it and it never left it
(CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE): an object someone imported under
our label, whose value they would know, is refused rather than used.

Mechanism: CKM_AES_GCM (C_Encrypt/C_Decrypt) of the 32-byte institution key, with a random
96-bit nonce and ``bound_aad`` as GCM's additional authenticated data. Why not C_WrapKey
with CKM_AES_KEY_WRAP (RFC 3394)? It takes no associated data, so binding the wrapped key
to its institution would need a second construction around it; it wraps key *objects*, so
every institution key would first be imported into the token as an extractable object; and
its 8-byte integrity check is weaker than GCM's 16-byte tag. The institution key is in
this process's memory by design (DESIGN §4: everything below the root key is software), so
encrypting it as data loses nothing. (SoftHSM2 supports both; CKM_AES_KEY_WRAP_PAD does not
work there.) Some HSMs in FIPS mode insist on generating GCM nonces themselves; such a token
would need the PKCS#11 3.0 CK_GCM_MESSAGE_PARAMS interface, which this backend does not use.

Retirement clears CKA_ENCRYPT and CKA_DECRYPT on the objects, so the token itself refuses
them afterwards. Rotation on two hosts at once (one HSM, no shared lock) can make two
objects with the same version: nothing is lost, because ``wrap`` always picks the one with
the smallest CKA_ID and ``unwrap`` tries each object of the version named.

Sessions. python-pkcs11 initialises the module without CKF_OS_LOCKING_OK, so calls into one
module are serialised by a process-wide lock, and each operation opens a session, logs in,
and closes it (about 5 ms on SoftHSM2). A long-lived logged-in session would be faster, but
PKCS#11 logins belong to the whole process: one keyring's logout would end another's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeGuard

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams
from pkcs11.types import DecryptMixin, EncryptMixin, SecretKey

from phivault.clock import Clock, SystemClock
from phivault.crypto.keyring.base import (
    MAX_VERSION,
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

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Library  # noqa: N812 - the stub names the class ``lib``

PIN_ENV = "PHIVAULT_PKCS11_PIN"
DEFAULT_KEY_LABEL = "phivault-root"
LOCK_FILE_NAME = "keyring-pkcs11.lock"

_NONCE_BYTES = 12
_TAG_BITS = 128
_WRAPPED_LENGTH = _NONCE_BYTES + WRAPPED_KEY_BYTES + _TAG_BITS // 8
_LABEL_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,48}")
_PARAMETERS = frozenset({"token", "label"})

# Attributes every root key object must have: generated in the token, never readable.
_REQUIRED_TRUE = (Attribute.TOKEN, Attribute.LOCAL, Attribute.SENSITIVE, Attribute.ALWAYS_SENSITIVE)
_REQUIRED_FALSE = (Attribute.EXTRACTABLE,)
_REQUIRED_NEVER_EXTRACTABLE = Attribute.NEVER_EXTRACTABLE

# Errors from C_Decrypt that mean "these bytes do not open under this key" (SoftHSM2 says
# CKR_GENERAL_ERROR for a bad GCM tag); anything else is the token's trouble, not the data's.
_BAD_CIPHERTEXT = (
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.DataInvalid,
    p11.DataLenRange,
    p11.GeneralError,
    p11.FunctionFailed,
)


class _TokenAesKey(Protocol):
    """A secret key object that may encrypt and decrypt.

    python-pkcs11 builds each object's class from its attributes: only a key with
    CKA_ENCRYPT and CKA_DECRYPT set has these methods (a retired one has neither).
    """

    def encrypt(self, data: bytes, buffer_size: int = ..., **kwargs: object) -> bytes | Iterator[bytes]: ...
    def decrypt(self, data: bytes, buffer_size: int = ..., **kwargs: object) -> bytes | Iterator[bytes]: ...


def _is_token_aes_key(candidate: object) -> TypeGuard[_TokenAesKey]:
    return isinstance(candidate, EncryptMixin) and isinstance(candidate, DecryptMixin)


@dataclass(frozen=True, slots=True)
class _RootKeyObject:
    version: int
    object_id: bytes
    created_at: datetime | None
    key: SecretKey
    cipher: _TokenAesKey | None  # None once retired

    @property
    def retired(self) -> bool:
        return self.cipher is None


class _Module:
    """One loaded PKCS#11 module, shared by every keyring of the process that names it."""

    _registry: dict[str, _Module] = {}  # noqa: RUF012 - deliberately one registry per process
    _registry_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self._pid = -1

    @classmethod
    def named(cls, path: str) -> _Module:
        with cls._registry_lock:
            return cls._registry.setdefault(path, cls(path))

    def library(self) -> Pkcs11Library:
        """The initialised module; call with ``self.lock`` held."""
        if not Path(self.path).is_file():
            raise KeyringUnavailable(f"PKCS#11 module {self.path} does not exist")
        try:
            library = pkcs11.lib(self.path)
            if self._pid not in (-1, os.getpid()):
                # PKCS#11: a forked child may not use its parent's initialisation; start anew.
                library.reinitialize()
        except p11.PKCS11Error as exc:
            raise KeyringUnavailable(f"cannot load PKCS#11 module {self.path}: {_error_name(exc)}") from None
        self._pid = os.getpid()
        return library


class Pkcs11Keyring:
    """Root keys generated and kept inside a PKCS#11 token."""

    def __init__(
        self,
        *,
        module_path: str,
        token_label: str,
        key_label: str = DEFAULT_KEY_LABEL,
        pin: str | None,
        lock_path: Path,
        clock: Clock | None = None,
    ) -> None:
        if not _LABEL_PATTERN.fullmatch(key_label):
            raise KeyringConfigError("pkcs11 key label must be 1-48 letters, digits, '.', '_' or '-'")
        self._module = _Module.named(module_path)
        self._token_label = token_label
        self._key_label = key_label
        self._pin = pin
        self._lock_path = lock_path
        self._clock: Clock = clock or SystemClock()
        self._label_pattern = re.compile(re.escape(key_label) + r"-v([1-9][0-9]{0,9})")

    @classmethod
    def from_url(cls, url: str, *, data_dir: Path, clock: Clock | None = None) -> Pkcs11Keyring:
        parts = split_keyring_url(url)
        if parts.netloc or not parts.path.startswith("/") or parts.fragment:
            raise KeyringConfigError(
                "pkcs11 keyring URL: pkcs11:///absolute/path/to/module.so?token=LABEL[&label=PREFIX]"
            )
        parameters = url_parameters(parts, _PARAMETERS)
        token = parameters.get("token", "")
        if not token:
            raise KeyringConfigError("pkcs11 keyring URL needs ?token=<token label>")
        return cls(
            module_path=parts.path,
            token_label=token,
            key_label=parameters.get("label", DEFAULT_KEY_LABEL),
            pin=os.environ.get(PIN_ENV) or None,
            lock_path=data_dir / LOCK_FILE_NAME,
            clock=clock,
        )

    @property
    def key_id(self) -> str:
        return f"pkcs11:{self._key_label}"

    def describe(self) -> str:
        return (
            f"PKCS#11 token {self._token_label!r} of module {self._module.path}, "
            f"root key objects {self._key_label}-v<N>"
        )

    def wrap(self, plaintext_key: bytes, *, aad: bytes) -> WrappedKey:
        check_plaintext_key(plaintext_key)
        with self._keys_session() as (_, keys):
            version = max(key.version for key in keys)
            ciphers = [k.cipher for k in _by_object_id(keys) if k.version == version and k.cipher is not None]
            if not ciphers:
                raise KeyringUnavailable(
                    f"{self.describe()}: the current root key v{version} cannot encrypt; create a new version"
                )
            nonce = secrets.token_bytes(_NONCE_BYTES)
            parameters = GCMParams(nonce, bound_aad(self.key_id, version, aad), _TAG_BITS)
            sealed = ciphers[0].encrypt(
                plaintext_key, mechanism=Mechanism.AES_GCM, mechanism_param=parameters
            )
        if not isinstance(sealed, bytes):  # only an iterator given as input gives an iterator back
            raise TypeError
        return WrappedKey(key_id=self.key_id, version=version, ciphertext=nonce + sealed)

    def unwrap(self, wrapped: WrappedKey, *, aad: bytes) -> bytes:
        if wrapped.key_id != self.key_id:
            raise UnknownRootKey(
                f"wrapped under root key {wrapped.key_id!r}; this keyring holds {self.key_id!r}"
            )
        with self._keys_session() as (_, keys):
            candidates = [k for k in keys if k.version == wrapped.version]
            if not candidates:
                raise UnknownRootKey(f"root key version {wrapped.version} is not in the token")
            ciphers = [k.cipher for k in _by_object_id(candidates) if k.cipher is not None]
            if not ciphers:
                raise KeyVersionRetired(f"root key version {wrapped.version} is retired")
            if len(wrapped.ciphertext) != _WRAPPED_LENGTH:
                raise KeyUnwrapError from None
            nonce, sealed = wrapped.ciphertext[:_NONCE_BYTES], wrapped.ciphertext[_NONCE_BYTES:]
            parameters = GCMParams(nonce, bound_aad(self.key_id, wrapped.version, aad), _TAG_BITS)
            for cipher in ciphers:
                try:
                    opened = cipher.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=parameters)
                except _BAD_CIPHERTEXT:
                    continue
                if isinstance(opened, bytes) and len(opened) == WRAPPED_KEY_BYTES:
                    return opened
        raise KeyUnwrapError from None

    def create_version(self) -> int:
        return self._create(only_if_empty=False)

    def current_version(self) -> int:
        with self._keys_session() as (_, keys):
            return max(key.version for key in keys)

    def versions(self) -> list[RootKeyVersion]:
        with self._keys_session() as (_, keys):
            pass
        current = max(key.version for key in keys)
        found: list[RootKeyVersion] = []
        for version in sorted({key.version for key in keys}):
            same = [k for k in _by_object_id(keys) if k.version == version]
            found.append(
                RootKeyVersion(
                    version=version,
                    created_at=same[0].created_at,
                    current=version == current,
                    retired=all(k.retired for k in same),
                )
            )
        return found

    def retire(self, version: int) -> None:
        with self._keys_session() as (_, keys):
            check_retirement(version, max(key.version for key in keys))
            for key in keys:
                if key.version <= version and not key.retired:
                    # The token enforces it: CKR_KEY_FUNCTION_NOT_PERMITTED from now on.
                    key.key[Attribute.DECRYPT] = False
                    key.key[Attribute.ENCRYPT] = False

    def check(self) -> None:
        probe = secrets.token_bytes(WRAPPED_KEY_BYTES)
        aad = b"phivault keyring check"
        if self.unwrap(self.wrap(probe, aad=aad), aad=aad) != probe:
            raise KeyringUnavailable(f"{self.describe()}: wrap/unwrap self-test failed")

    def close(self) -> None:
        """Nothing to release: every operation opens and closes its own session."""

    # --- the token ------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self) -> Iterator[pkcs11.Session]:
        if self._pin is None:
            raise KeyringUnavailable(f"{PIN_ENV} is not set: the PKCS#11 keyring needs the token's user PIN")
        with self._module.lock:
            library = self._module.library()
            token_name = f"PKCS#11 token {self._token_label!r}"
            try:
                token = library.get_token(token_label=self._token_label)
                session = token.open(rw=True, user_pin=self._pin)
            except p11.NoSuchToken:
                raise KeyringUnavailable(f"no {token_name} in module {self._module.path}") from None
            except p11.MultipleTokensReturned:
                raise KeyringUnavailable(
                    f"more than one {token_name} in module {self._module.path}"
                ) from None
            except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
                raise KeyringUnavailable(f"{token_name} refused the PIN in {PIN_ENV}") from None
            except p11.PinLocked:
                raise KeyringUnavailable(f"the user PIN of {token_name} is locked") from None
            except p11.PKCS11Error as exc:
                raise KeyringUnavailable(f"cannot log in to {token_name}: {_error_name(exc)}") from None
            try:
                yield session
            except p11.PKCS11Error as exc:
                raise KeyringUnavailable(f"{token_name} failed: {_error_name(exc)}") from None
            finally:
                with contextlib.suppress(p11.PKCS11Error):
                    session.close()

    @contextlib.contextmanager
    def _keys_session(self) -> Iterator[tuple[pkcs11.Session, list[_RootKeyObject]]]:
        """A session and the root key objects in the token, creating version 1 on first use."""
        for _ in range(2):
            with self._session() as session:
                keys = self._root_keys(session)
                if keys:
                    yield session, keys
                    return
            # Outside the session: the file lock is always taken before the module's lock.
            self._create(only_if_empty=True)
        raise KeyringUnavailable(f"{self.describe()}: the first root key vanished as it was made")

    def _root_keys(self, session: pkcs11.Session) -> list[_RootKeyObject]:
        found: list[_RootKeyObject] = []
        template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES}
        for candidate in session.get_objects(template):
            label = candidate[Attribute.LABEL]
            match = self._label_pattern.fullmatch(label) if isinstance(label, str) else None
            if match is None or not isinstance(candidate, SecretKey):
                continue
            self._refuse_unless_trustworthy(candidate, label)
            attributes = candidate.get_attributes([Attribute.ID, Attribute.ENCRYPT, Attribute.DECRYPT])
            object_id = attributes[Attribute.ID]
            usable = attributes[Attribute.ENCRYPT] and attributes[Attribute.DECRYPT]
            found.append(
                _RootKeyObject(
                    version=int(match.group(1)),
                    object_id=object_id,
                    created_at=_created_at(object_id),
                    key=candidate,
                    cipher=candidate if usable and _is_token_aes_key(candidate) else None,
                )
            )
        return found

    def _refuse_unless_trustworthy(self, candidate: SecretKey, label: str) -> None:
        names = [*_REQUIRED_TRUE, *_REQUIRED_FALSE, _REQUIRED_NEVER_EXTRACTABLE]
        attributes = candidate.get_attributes(names)
        safe = (
            all(attributes[name] is True for name in _REQUIRED_TRUE)
            and all(attributes[name] is False for name in _REQUIRED_FALSE)
            and attributes[_REQUIRED_NEVER_EXTRACTABLE] is True
            and candidate.key_length == 256  # noqa: PLR2004 - AES-256, bits
        )
        if not safe:
            raise KeyringUnavailable(
                f"token object {label!r} is not an AES-256 key generated in the token and never "
                "extractable; refusing to use it (remove or relabel it)"
            )

    def _create(self, *, only_if_empty: bool) -> int:
        with self._file_lock(), self._session() as session:
            keys = self._root_keys(session)
            if keys and only_if_empty:
                return max(key.version for key in keys)
            version = max((key.version for key in keys), default=0) + 1
            if version > MAX_VERSION:
                raise KeyringUnavailable("root key version numbers are exhausted")
            self._generate(session, version)
            return version

    def _generate(self, session: pkcs11.Session, version: int) -> None:
        created = int(self._clock.now().timestamp())
        object_id = f"{version}:{created}:{secrets.token_hex(8)}".encode("ascii")
        session.generate_key(
            KeyType.AES,
            256,
            id=object_id,
            label=f"{self._key_label}-v{version}",
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.WRAP: False,
                Attribute.UNWRAP: False,
                Attribute.SIGN: False,
                Attribute.VERIFY: False,
                Attribute.DERIVE: False,
                Attribute.COPYABLE: False,
                Attribute.MODIFIABLE: True,  # retirement clears ENCRYPT/DECRYPT
            },
        )

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        try:
            self._lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyringUnavailable(f"cannot open lock file {self._lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _by_object_id(keys: list[_RootKeyObject]) -> list[_RootKeyObject]:
    """Objects in a fixed order, so every process picks the same one of a duplicated version."""
    return sorted(keys, key=lambda key: key.object_id)


def _created_at(object_id: bytes) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(object_id.split(b":")[1]), tz=UTC)
    except (IndexError, ValueError, OverflowError, OSError):
        return None


def _error_name(exc: p11.PKCS11Error) -> str:
    # python-pkcs11's messages are empty or name a file; the class names the CKR_ code.
    detail = str(exc).strip()
    return f"{type(exc).__name__} ({detail})" if detail else type(exc).__name__
