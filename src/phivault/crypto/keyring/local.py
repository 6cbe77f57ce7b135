"""The default keyring: root keys in a file of the data directory, sealed by the master key.

``<data_dir>/keyring.json`` (mode 0600) lists the root key versions. Each root key is 32
random bytes sealed with AES-256-GCM under a key derived from the master key (HKDF-SHA256,
RFC 5869), with a random 96-bit nonce and the key id, version and creation time as
associated data; an HMAC-SHA256 under a second derived key covers the whole file, so
without the master key nobody can un-retire a version or slip in a root key of their own.
A stolen data directory without the master key (kept elsewhere) opens nothing.

Institution keys are wrapped with AES-256-GCM under the current root key, random nonce,
associated data from ``bound_aad``. A wrapped key is ``nonce ‖ ciphertext ‖ tag`` (60 bytes).

Several processes (``serve`` replicas, workers, the CLI) share the file. Changes take an
exclusive ``fcntl`` lock, re-read the file under it, and replace it atomically (temporary
file, fsync, rename, fsync of the directory); readers notice a new file by its inode and
reload it, so a version created or retired elsewhere is seen at the next operation.
What cannot be detected here is a rollback to an older copy of the file, or its loss: the
database holds keys wrapped by these root keys, so back up the file with it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from phivault.clock import Clock, SystemClock
from phivault.crypto.keyring.base import (
    WRAPPED_KEY_BYTES,
    RootKeyVersion,
    WrappedKey,
    bound_aad,
    check_plaintext_key,
    check_retirement,
)
from phivault.crypto.keyring.errors import (
    KeyringUnavailable,
    KeyUnwrapError,
    KeyVersionRetired,
    UnknownRootKey,
)
from phivault.crypto.master_key import MasterKeyError, read_master_key

KEYRING_FILE_NAME = "keyring.json"
FILE_FORMAT = "phivault-local-keyring/1"

_NONCE_BYTES = 12
_TAG_BYTES = 16
_ROOT_KEY_BYTES = 32
_WRAPPED_LENGTH = _NONCE_BYTES + WRAPPED_KEY_BYTES + _TAG_BYTES
_SEAL_INFO = b"phivault local keyring seal v1"
_MAC_INFO = b"phivault local keyring mac v1"


@dataclass(frozen=True, slots=True)
class _VersionRecord:
    version: int
    created_at: datetime
    retired_at: datetime | None
    sealed: bytes  # nonce ‖ AES-GCM(seal key, root key) ‖ tag


@dataclass(frozen=True, slots=True)
class _Document:
    key_id: str
    versions: tuple[_VersionRecord, ...]

    @property
    def current(self) -> int:
        return self.versions[-1].version


@dataclass(frozen=True, slots=True)
class _FileIdentity:
    device: int
    inode: int
    mtime_ns: int
    size: int


@dataclass(frozen=True, slots=True)
class _Loaded:
    document: _Document
    root_keys: dict[int, AESGCM]
    identity: _FileIdentity


class LocalKeyring:
    """Root keys in ``<data_dir>/keyring.json``, sealed by the key in ``master_key_path``."""

    def __init__(self, *, data_dir: Path, master_key_path: Path, clock: Clock | None = None) -> None:
        self._dir = data_dir
        self._path = data_dir / KEYRING_FILE_NAME
        self._lock_path = data_dir / (KEYRING_FILE_NAME + ".lock")
        self._master_key_path = master_key_path
        self._clock: Clock = clock or SystemClock()
        self._mutex = threading.Lock()
        self._loaded: _Loaded | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def key_id(self) -> str:
        return self._state().document.key_id

    def describe(self) -> str:
        return f"local keyring {self._path} sealed by the master key {self._master_key_path}"

    def wrap(self, plaintext_key: bytes, *, aad: bytes) -> WrappedKey:
        check_plaintext_key(plaintext_key)
        state = self._state()
        key_id, version = state.document.key_id, state.document.current
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = state.root_keys[version].encrypt(nonce, plaintext_key, bound_aad(key_id, version, aad))
        return WrappedKey(key_id=key_id, version=version, ciphertext=nonce + sealed)

    def unwrap(self, wrapped: WrappedKey, *, aad: bytes) -> bytes:
        state = self._state()
        document = state.document
        if wrapped.key_id != document.key_id:
            raise UnknownRootKey(
                f"wrapped under root key {wrapped.key_id!r}; this keyring holds {document.key_id!r}"
            )
        record = next((r for r in document.versions if r.version == wrapped.version), None)
        if record is None:
            raise UnknownRootKey(f"root key version {wrapped.version} does not exist")
        if record.retired_at is not None:
            raise KeyVersionRetired(f"root key version {wrapped.version} is retired")
        if len(wrapped.ciphertext) != _WRAPPED_LENGTH:
            raise KeyUnwrapError from None
        nonce, sealed = wrapped.ciphertext[:_NONCE_BYTES], wrapped.ciphertext[_NONCE_BYTES:]
        try:
            return state.root_keys[record.version].decrypt(
                nonce, sealed, bound_aad(document.key_id, record.version, aad)
            )
        except InvalidTag:
            raise KeyUnwrapError from None

    def create_version(self) -> int:
        with self._locked_for_change() as document:
            record = self._new_version(document.key_id, document.current + 1)
            self._write(replace(document, versions=(*document.versions, record)))
        return record.version

    def current_version(self) -> int:
        return self._state().document.current

    def versions(self) -> list[RootKeyVersion]:
        document = self._state().document
        return [
            RootKeyVersion(
                version=record.version,
                created_at=record.created_at,
                current=record.version == document.current,
                retired=record.retired_at is not None,
            )
            for record in document.versions
        ]

    def retire(self, version: int) -> None:
        with self._locked_for_change() as document:
            check_retirement(version, document.current)
            now = self._clock.now()
            records = tuple(
                replace(record, retired_at=now)
                if record.version <= version and record.retired_at is None
                else record
                for record in document.versions
            )
            self._write(replace(document, versions=records))

    def check(self) -> None:
        probe = secrets.token_bytes(WRAPPED_KEY_BYTES)
        aad = b"phivault keyring check"
        if self.unwrap(self.wrap(probe, aad=aad), aad=aad) != probe:
            raise KeyringUnavailable(f"{self.describe()}: wrap/unwrap self-test failed")

    def close(self) -> None:
        with self._mutex:
            self._loaded = None

    # --- the file -------------------------------------------------------------------

    def _state(self) -> _Loaded:
        """The keyring as on disk now: reloaded when the file changed, created on first use."""
        for _ in range(2):
            with self._mutex:
                identity = self._identity()
                if identity is not None:
                    if self._loaded is None or identity != self._loaded.identity:
                        self._loaded = self._load()
                    return self._loaded
                if self._loaded is not None:
                    raise KeyringUnavailable(f"keyring file {self._path} has disappeared; restore it")
            # Outside the mutex: the file lock is always taken first, the mutex second.
            self._create_first_version()
        raise KeyringUnavailable(f"keyring file {self._path} vanished as it was created")

    def _identity(self) -> _FileIdentity | None:
        try:
            info = self._path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyringUnavailable(f"cannot read keyring file {self._path}: {exc.strerror}") from None
        return _FileIdentity(info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)

    def _keys(self) -> tuple[AESGCM, bytes]:
        """The sealing cipher and the MAC key, derived from the master key."""
        try:
            master = read_master_key(self._master_key_path)
        except MasterKeyError as exc:
            raise KeyringUnavailable(str(exc)) from None
        seal_key = _derive(master, _SEAL_INFO)
        mac_key = _derive(master, _MAC_INFO)
        return AESGCM(seal_key), mac_key

    def _load(self) -> _Loaded:
        seal, mac_key = self._keys()
        try:
            with self._path.open("rb") as handle:
                info = os.fstat(handle.fileno())
                raw = handle.read()
        except OSError as exc:
            raise KeyringUnavailable(f"cannot read keyring file {self._path}: {exc.strerror}") from None
        if stat.S_IMODE(info.st_mode) & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise KeyringUnavailable(
                f"keyring file {self._path} is open to others (mode {mode:o}); chmod 600"
            )
        document = _parse_document(raw, self._path, mac_key, self._master_key_path)
        root_keys: dict[int, AESGCM] = {}
        for record in document.versions:
            try:
                root_key = seal.decrypt(
                    record.sealed[:_NONCE_BYTES], record.sealed[_NONCE_BYTES:], _seal_aad(document, record)
                )
            except InvalidTag:
                raise KeyringUnavailable(f"keyring file {self._path} is damaged") from None
            root_keys[record.version] = AESGCM(root_key)
        identity = _FileIdentity(info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        return _Loaded(document=document, root_keys=root_keys, identity=identity)

    def _create_first_version(self) -> None:
        with self._file_lock():
            if self._identity() is not None:  # another process made it while we waited
                return
            key_id = "local-" + secrets.token_hex(8)
            self._write(_Document(key_id=key_id, versions=(self._new_version(key_id, 1),)))

    def _new_version(self, key_id: str, version: int) -> _VersionRecord:
        seal, _ = self._keys()
        created_at = self._clock.now()
        record = _VersionRecord(version=version, created_at=created_at, retired_at=None, sealed=b"")
        nonce = secrets.token_bytes(_NONCE_BYTES)
        aad = _seal_aad(_Document(key_id=key_id, versions=()), record)
        sealed = seal.encrypt(nonce, secrets.token_bytes(_ROOT_KEY_BYTES), aad)
        return replace(record, sealed=nonce + sealed)

    @contextlib.contextmanager
    def _locked_for_change(self) -> Iterator[_Document]:
        """The current document under the file lock, read again after the lock was taken."""
        self._state()  # creates version 1 first if the file does not exist yet
        with self._file_lock(), self._mutex:
            self._loaded = self._load()
            yield self._loaded.document
            self._loaded = None  # the next operation reads what was written

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyringUnavailable(f"cannot lock keyring file {self._path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, document: _Document) -> None:
        _, mac_key = self._keys()
        encoded = _encode_document(document, mac_key)
        temporary = self._dir / f".{KEYRING_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(encoded)
                    handle.flush()
                    os.fsync(handle.fileno())
                temporary.replace(self._path)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            directory = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise KeyringUnavailable(f"cannot write keyring file {self._path}: {exc.strerror}") from None


def _derive(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


def _seal_aad(document: _Document, record: _VersionRecord) -> bytes:
    # The root key is bound to its name, number and birth: moving a sealed key to another
    # version's slot, or to another keyring, fails to open.
    created = _format_time(record.created_at).encode("ascii")
    return b"phivault local keyring root key\x00" + bound_aad(document.key_id, record.version, created)


def _format_time(value: datetime) -> str:
    return value.isoformat(timespec="microseconds")


def _canonical(body: dict[str, object]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _document_body(document: _Document) -> dict[str, object]:
    return {
        "format": FILE_FORMAT,
        "key_id": document.key_id,
        "versions": [
            {
                "version": record.version,
                "created_at": _format_time(record.created_at),
                "retired_at": None if record.retired_at is None else _format_time(record.retired_at),
                "sealed": base64.b64encode(record.sealed).decode("ascii"),
            }
            for record in document.versions
        ],
    }


def _encode_document(document: _Document, mac_key: bytes) -> bytes:
    body = _document_body(document)
    mac = hmac.new(mac_key, _canonical(body), hashlib.sha256).digest()
    body["mac"] = base64.b64encode(mac).decode("ascii")
    return json.dumps(body, indent=2, sort_keys=True).encode("ascii") + b"\n"


def _parse_document(raw: bytes, path: Path, mac_key: bytes, master_key_path: Path) -> _Document:
    damaged = KeyringUnavailable(f"keyring file {path} is damaged or not a phivault keyring")
    try:
        body = json.loads(raw)
        if not isinstance(body, dict) or body.get("format") != FILE_FORMAT:
            raise damaged
        mac = base64.b64decode(body.pop("mac"), validate=True)
        document = _document_from_body(body)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise damaged from None
    if _canonical(_document_body(document)) != _canonical(body):
        raise damaged
    expected = hmac.new(mac_key, _canonical(body), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise KeyringUnavailable(f"the master key {master_key_path} does not open the keyring {path}")
    return document


def _document_from_body(body: dict[str, object]) -> _Document:
    key_id = body["key_id"]
    entries = body["versions"]
    if not isinstance(key_id, str) or not isinstance(entries, list) or not entries:
        raise ValueError
    records: list[_VersionRecord] = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or entry["version"] != number:
            raise ValueError  # versions run 1, 2, 3 … with no gap
        retired_at = entry["retired_at"]
        records.append(
            _VersionRecord(
                version=number,
                created_at=datetime.fromisoformat(entry["created_at"]),
                retired_at=None if retired_at is None else datetime.fromisoformat(retired_at),
                sealed=base64.b64decode(entry["sealed"], validate=True),
            )
        )
    if records[-1].retired_at is not None:
        raise ValueError  # the current version is never retired
    return _Document(key_id=key_id, versions=tuple(records))
