r"""The key hierarchy and the easy encryption API the rest of phivault uses (DESIGN §4).

::

    root key (keyring: local file, HSM or OpenBao; versioned)
      └─ institution key    32 random bytes, wrapped by the keyring         institution_keys
          └─ patient key    32 random bytes, AES-256-GCM under the above    patient_keys
              ├─ object DEK  32 random bytes per object, AES-256-GCM under a subkey of the
              │              patient key, stored in the object's header (stream.py)
              └─ PHI fields  AES-256-GCM under another subkey of the patient key

Callers never see a key or a nonce: they name an institution and a patient key id and
call ``encrypt_object``/``open_object``/``encrypt_field``/``decrypt_field`` on the
runtime's ``KeyHierarchy`` (``runtime.keys``).

Binding (associated data). Every wrapped key and every ciphertext is bound to where it
belongs, so rows and objects cannot be swapped unnoticed:

* institution key: ``"phivault/institution-key/" ‖ institution id ‖ version`` (and the
  keyring adds its root key id and version);
* patient key: its own id, the institution id and the id of the institution key row that
  wraps it;
* object DEK: the object store key, institution id and patient key id; the object's
  segments: the object store key and institution id; the header names the patient key;
* PHI field: the patient key id and the caller's ``aad`` (say, table, column and row id).

Every variable-length part is length-prefixed, so no two different tuples encode alike.
The patient key is never used directly: HKDF-SHA256 (RFC 5869) derives one subkey for
DEK wrapping and one for fields, so the two uses cannot be confused (key separation,
SP 800-57 Part 1 §5.2). AES-GCM with random 96-bit nonces stays far below the 2^32
invocations per key of SP 800-38D §8.3 for any one patient.

Caching. Unwrapped institution keys are cached in-process for a few minutes (bounded), so
a request does not reach the HSM or OpenBao for every object. Patient keys are never
cached: they are unwrapped for one call and dropped, so destroying one takes effect at
once everywhere.

Crypto-shredding. ``destroy_patient_key`` sets the wrapped patient key to NULL and appends
to the purge ledger in the caller's transaction; from then on every object and field of
that patient raises ``KeyShredded``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import func, select, update

from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.service import Actor, Subject, SystemSubject, Target, record
from phivault.crypto import stream
from phivault.crypto.errors import (
    InvalidParameterError,
    KeyIntegrityError,
    KeyNotFound,
    KeyShredded,
    ObjectIntegrityError,
)
from phivault.crypto.keyring import Keyring, WrappedKey
from phivault.crypto.keyring.errors import KeyUnwrapError
from phivault.crypto.models import (
    InstitutionKey,
    InstitutionKeyStatus,
    PatientKey,
    PurgeLedgerEntry,
    PurgeReason,
)
from phivault.ids import new_id
from phivault.storage.base import ObjectStore, new_object_key

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from phivault.clock import Clock
    from phivault.db.engine import Database

__all__ = [
    "EncryptedObject",
    "KeyHierarchy",
    "ObjectContext",
    "OpenedObject",
    "PendingObject",
    "SealedField",
    "institution_key_aad",
]

log = logging.getLogger(__name__)

KEY_SIZE: Final = 32
_NONCE_SIZE: Final = 12
_SEALED_VERSION: Final = 1
_SEALED_OVERHEAD: Final = 1 + _NONCE_SIZE + 16
CACHE_TTL: Final = timedelta(minutes=5)
CACHE_ENTRIES: Final = 1024
_PATIENT_KEY_LABEL: Final = "patient-key/"
_CRYPTO_ACTOR: Final = Actor.system("crypto")
# Reading in these pieces keeps memory flat whatever the object size (stream.py's segments).
_PUT_BUFFER: Final = 1 << 20
_KEY_BATCH: Final = 500  # patient keys per query of decrypt_fields


# --- Associated data and the small AEAD ---------------------------------------------------


def _field(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(4, "big") + data


def institution_key_aad(institution_id: str, version: int) -> bytes:
    """What an institution key is bound to when the keyring wraps it."""
    return b"phivault/institution-key/" + _field(institution_id) + version.to_bytes(4, "big")


def _patient_key_aad(patient_key_id: str, institution_id: str, institution_key_id: str) -> bytes:
    return (
        b"phivault/patient-key/"
        + _field(patient_key_id)
        + _field(institution_id)
        + _field(institution_key_id)
    )


def _dek_aad(object_key: str, institution_id: str, patient_key_id: str) -> bytes:
    return b"phivault/object-dek/" + _field(object_key) + _field(institution_id) + _field(patient_key_id)


def _object_aad(object_key: str, institution_id: str) -> bytes:
    return b"phivault/object/" + _field(object_key) + _field(institution_id)


def _field_aad(patient_key_id: str, aad: bytes) -> bytes:
    return b"phivault/phi-field/" + _field(patient_key_id) + _field(aad)


def _subkey(patient_key: bytes, purpose: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=b"phivault/patient-key/" + purpose
    ).derive(patient_key)


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``0x01 ‖ nonce ‖ AES-256-GCM ciphertext ‖ tag``, with a fresh random nonce."""
    nonce = os.urandom(_NONCE_SIZE)
    return bytes([_SEALED_VERSION]) + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Inverse of ``_seal``; anything wrong raises ``InvalidTag``."""
    if len(sealed) < _SEALED_OVERHEAD or sealed[0] != _SEALED_VERSION:
        raise InvalidTag
    return AESGCM(key).decrypt(sealed[1 : 1 + _NONCE_SIZE], sealed[1 + _NONCE_SIZE :], aad)


def _patient_key_label(patient_key_id: str) -> str:
    return _PATIENT_KEY_LABEL + patient_key_id


def _same_header(header: stream.ObjectHeader, expected: stream.ObjectHeader) -> stream.ObjectHeader:
    # The object was replaced since it was opened (objects are immutable: tampering).
    if header != expected:
        raise ObjectIntegrityError
    return header


def _named_header(header: stream.ObjectHeader, patient_key_id: str) -> stream.ObjectHeader:
    # Another patient's object in this patient's row.
    if header.key_ids != (_patient_key_label(patient_key_id),):
        raise ObjectIntegrityError
    return header


# --- Values crossing the API ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectContext:
    """Whose object this is: the owning institution, the patient key, and the kind of object.

    ``kind`` becomes the first part of the object store key (``new_object_key``).
    """

    institution_id: str
    patient_key_id: str
    kind: str


@dataclass(frozen=True, slots=True)
class SealedField:
    """One value of ``encrypt_field`` to open: its patient key, ciphertext and binding."""

    patient_key_id: str
    sealed: bytes
    aad: bytes


@dataclass(frozen=True, slots=True)
class EncryptedObject:
    """What ``encrypt_object`` stored: its key, plaintext size and SHA-256, stored size."""

    key: str
    size: int
    sha256: str
    ciphertext_size: int


# --- The institution key cache ----------------------------------------------------------


class _InstitutionKeyCache:
    """Unwrapped institution keys by row id, for ``ttl`` at most, ``entries`` at most."""

    def __init__(self, clock: Clock, ttl: timedelta, entries: int) -> None:
        self._clock = clock
        self._ttl = ttl
        self._entries = entries
        self._keys: OrderedDict[str, tuple[bytes, datetime]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key_id: str) -> bytes | None:
        with self._lock:
            entry = self._keys.get(key_id)
            if entry is None:
                return None
            key, expires = entry
            if self._clock.now() >= expires:
                del self._keys[key_id]
                return None
            return key

    def put(self, key_id: str, key: bytes) -> None:
        with self._lock:
            self._keys[key_id] = (key, self._clock.now() + self._ttl)
            self._keys.move_to_end(key_id)
            while len(self._keys) > self._entries:
                self._keys.popitem(last=False)

    def discard(self, key_id: str) -> None:
        with self._lock:
            self._keys.pop(key_id, None)

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()

    def __contains__(self, key_id: str) -> bool:
        return self.get(key_id) is not None


# --- Object I/O adapters ------------------------------------------------------------------


class _StoredObjectSource:
    """An object of the store as a ``stream.RangeSource``; the size is read once."""

    __slots__ = ("_key", "_size", "_store")

    def __init__(self, store: ObjectStore, key: str) -> None:
        self._store = store
        self._key = key
        self._size: int | None = None

    def size(self) -> int:
        if self._size is None:
            self._size = self._store.size(self._key)
        return self._size

    def read_range(self, start: int, length: int) -> bytes:
        return self._store.read_range(self._key, start, length)


class _ChunksAsRaw(io.RawIOBase):
    """A readable file over an iterator of byte strings (``ObjectStore.put`` pulls)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        count = min(len(view), len(self._pending))
        view[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


class _HashingReader:
    """Passes ``read`` through, counting bytes and hashing them (the plaintext's SHA-256)."""

    __slots__ = ("_source", "digest", "size")

    def __init__(self, source: stream.ReadableStream) -> None:
        self._source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int, /) -> bytes:
        data = self._source.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


# --- Opened objects -----------------------------------------------------------------------


class OpenedObject:
    """A decryptable object: random access (``read``/``iter_range``) or a whole-object stream.

    Every byte returned was authenticated. Any integrity failure raises
    ``ObjectIntegrityError`` (and raises a security alert); nothing unauthenticated is
    ever returned. Safe to share between threads when the object store is.
    """

    __slots__ = ("_alarm", "_associated_data", "_dek", "_key", "_reader", "_store")

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        reader: stream.ObjectReader,
        dek: bytes,
        associated_data: bytes,
        alarm: _Alarm,
    ) -> None:
        self._store = store
        self._key = key
        self._reader = reader
        self._dek = dek
        self._associated_data = associated_data
        self._alarm = alarm

    @property
    def key(self) -> str:
        return self._key

    @property
    def plaintext_size(self) -> int:
        return self._reader.plaintext_size

    def read(self, offset: int, length: int) -> bytes:
        """Plaintext ``[offset, offset + length)``; the range must lie inside the object."""
        return b"".join(self.iter_range(offset, length))

    def iter_range(self, offset: int, length: int) -> Iterator[bytes]:
        """Plaintext ``[offset, offset + length)`` in pieces (segments fetched as needed)."""
        try:
            yield from self._reader.iter_range(offset, length)
        except ObjectIntegrityError:
            self._alarm(self._key)
            raise

    def iter_plaintext(self) -> Iterator[bytes]:
        """The whole object, one segment at a time, read sequentially from the store.

        The object is known to be complete only when the iterator ends without an error.
        """
        try:
            with self._store.open(self._key) as source:
                header = _same_header(stream.read_header(source), self._reader.header)
                yield from stream.iter_plaintext(
                    source, header=header, dek=self._dek, associated_data=self._associated_data
                )
        except ObjectIntegrityError:
            self._alarm(self._key)
            raise


class PlaintextStream(io.BufferedIOBase):
    """The plaintext of objects laid end to end (an upload's chunks, in order; or one
    object), as one seekable binary stream.

    Every byte returned was authenticated (an altered chunk object fails with
    ``ObjectIntegrityError``). Reads fetch ciphertext in runs of segments, so memory stays
    flat whatever the size. ``read(n)`` returns ``n`` bytes unless the end comes first (a
    parser may rely on it). Deliberately not an ``io.BufferedReader``: pydicom takes those
    for files on disk and would reopen them by name.
    """

    def __init__(self, chunks: list[tuple[int, OpenedObject]], length: int) -> None:
        super().__init__()
        self._chunks = chunks  # (start, opened object), ordered by start
        self._length = length
        self._position = 0
        self._pieces: Iterator[bytes] | None = None
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        target = base + offset
        if target < 0:
            msg = "negative seek position"
            raise ValueError(msg)
        if target != self._position:
            self._position = target
            self._pieces = None
            self._pending = memoryview(b"")
        return self._position

    def read(self, size: int | None = -1, /) -> bytes:
        wanted = self._length - self._position if size is None or size < 0 else size
        parts: list[bytes] = []
        while wanted > 0:
            piece = self.read1(wanted)
            if not piece:
                break
            parts.append(piece)
            wanted -= len(piece)
        return b"".join(parts)

    def read1(self, size: int = -1, /) -> bytes:
        if self._position >= self._length or size == 0:
            return b""
        while not self._pending:
            if self._pieces is None:
                self._pieces = self._iter_from(self._position)
            piece = next(self._pieces, None)
            if piece is None:
                return b""
            self._pending = memoryview(piece)
        count = len(self._pending) if size < 0 else min(size, len(self._pending))
        data = bytes(self._pending[:count])
        self._pending = self._pending[count:]
        self._position += count
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def _iter_from(self, position: int) -> Iterator[bytes]:
        for start, opened in self._chunks:
            size = opened.plaintext_size
            if position >= start + size:
                continue
            local = max(0, position - start)
            yield from opened.iter_range(local, size - local)


class PendingObject:
    """A new object's key and sealed DEK (from ``prepare_object``); ``write`` it once."""

    __slots__ = ("_context", "_dek", "_wrapped_dek", "_written", "key")

    def __init__(self, key: str, context: ObjectContext, dek: bytes, wrapped_dek: bytes) -> None:
        self.key = key
        self._context = context
        self._dek = dek
        self._wrapped_dek = wrapped_dek
        self._written = False

    def write(
        self,
        store: ObjectStore,
        source: stream.ReadableStream,
        *,
        segment_size: int = stream.DEFAULT_SEGMENT_SIZE,
    ) -> EncryptedObject:
        """Encrypt ``source`` into the store under ``key``, streaming; only once."""
        if self._written:
            msg = "this object was already written; prepare a new one"
            raise InvalidParameterError(msg)
        self._written = True
        plaintext = _HashingReader(source)
        chunks = stream.iter_ciphertext(
            plaintext,
            dek=self._dek,
            key_ids=(_patient_key_label(self._context.patient_key_id),),
            wrapped_dek=self._wrapped_dek,
            segment_size=segment_size,
            associated_data=_object_aad(self.key, self._context.institution_id),
        )
        with io.BufferedReader(_ChunksAsRaw(chunks), buffer_size=_PUT_BUFFER) as ciphertext:
            stored = store.put(self.key, ciphertext)
        return EncryptedObject(
            key=self.key,
            size=plaintext.size,
            sha256=plaintext.digest.hexdigest(),
            ciphertext_size=stored.size,
        )


class _Alarm:
    """Raises the security alert for one institution's object that failed authentication."""

    __slots__ = ("_hierarchy", "_institution_id")

    def __init__(self, hierarchy: KeyHierarchy, institution_id: str) -> None:
        self._hierarchy = hierarchy
        self._institution_id = institution_id

    def __call__(self, object_key: str) -> None:
        self._hierarchy.integrity_alarm(object_key, self._institution_id)


# --- The hierarchy ------------------------------------------------------------------------


class KeyHierarchy:
    """Creates, uses, and destroys the keys below the keyring's root key.

    One per process (``runtime.keys``): it holds the institution key cache. Every method
    that takes a ``session`` works inside the caller's transaction.
    """

    def __init__(
        self,
        keyring: Keyring,
        clock: Clock,
        *,
        alarm_db: Database | None = None,
        cache_ttl: timedelta = CACHE_TTL,
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        self.keyring = keyring
        self.clock = clock
        self._alarm_db = alarm_db
        self._cache = _InstitutionKeyCache(clock, cache_ttl, cache_entries)
        self._alarm_threads: list[threading.Thread] = []
        self._alarm_lock = threading.Lock()

    # --- institution keys ------------------------------------------------------------

    def new_institution_key(self, session: Session, institution_id: str, now: datetime) -> str:
        """Create version 1 of an institution's key; return its row id.

        An institution that already has a key is refused: use rotation for a new version.
        """
        if not institution_id or len(institution_id) > 64:  # noqa: PLR2004 - the column's width
            msg = "institution id must be 1..64 characters"
            raise InvalidParameterError(msg)
        existing = session.scalar(
            select(func.count())
            .select_from(InstitutionKey)
            .where(InstitutionKey.institution_id == institution_id)
        )
        if existing:
            msg = "this institution already has a key; rotate it for a new version"
            raise InvalidParameterError(msg)
        row = self.create_institution_key_row(institution_id, 1, now)
        session.add(row)
        session.flush()
        record(
            session,
            AuditAction.KEY_CREATE,
            SystemSubject(_CRYPTO_ACTOR, institution_id),
            Target("institution_key", row.id),
            Outcome.SUCCESS,
            now=now,
        )
        return row.id

    def create_institution_key_row(self, institution_id: str, version: int, now: datetime) -> InstitutionKey:
        """A new institution key wrapped under the current root key version (for rotation)."""
        key = os.urandom(KEY_SIZE)
        wrapped = self.keyring.wrap(key, aad=institution_key_aad(institution_id, version))
        row = InstitutionKey(
            id=new_id(),
            institution_id=institution_id,
            version=version,
            status=InstitutionKeyStatus.CURRENT.value,
            wrapped_key=wrapped.to_bytes(),
            root_key_id=wrapped.key_id,
            root_version=wrapped.version,
            created_at=now,
            retired_at=None,
        )
        self._cache.put(row.id, key)
        return row

    def unwrap_institution_key(self, row: InstitutionKey) -> bytes:
        """The institution key of ``row``, from the cache or the keyring."""
        cached = self._cache.get(row.id)
        if cached is not None:
            return cached
        try:
            key = self.keyring.unwrap(
                WrappedKey.from_bytes(row.wrapped_key),
                aad=institution_key_aad(row.institution_id, row.version),
            )
        except KeyUnwrapError:
            raise KeyIntegrityError from None
        self._cache.put(row.id, key)
        return key

    def forget_institution_key(self, key_id: str) -> None:
        """Drop one institution key from this process's cache (it was retired)."""
        self._cache.discard(key_id)

    def forget_all(self) -> None:
        """Empty the institution key cache."""
        self._cache.clear()

    def is_cached(self, key_id: str) -> bool:
        return key_id in self._cache

    def _current_institution_key(self, session: Session, institution_id: str) -> InstitutionKey:
        # FOR SHARE: patient keys may be created side by side, but rotation's FOR UPDATE on
        # this row waits until they commit, so none is wrapped under a version it has
        # already moved away from. A statement that waited re-checks the status and finds
        # nothing if rotation just superseded the row: ask once more (a new snapshot).
        query = (
            select(InstitutionKey)
            .where(
                InstitutionKey.institution_id == institution_id,
                InstitutionKey.status == InstitutionKeyStatus.CURRENT.value,
            )
            .with_for_update(read=True)
        )
        for _ in range(2):
            row = session.scalars(query).first()
            if row is not None:
                return row
        msg = "the institution has no key; create one with new_institution_key"
        raise KeyNotFound(msg)

    # --- patient keys ------------------------------------------------------------------

    def new_patient_key(self, session: Session, institution_id: str, now: datetime) -> str:
        """Create a patient key under the institution's current key; return its id."""
        institution_key = self._current_institution_key(session, institution_id)
        wrapping_key = self.unwrap_institution_key(institution_key)
        patient_key_id = new_id()
        wrapped = _seal(
            wrapping_key,
            os.urandom(KEY_SIZE),
            _patient_key_aad(patient_key_id, institution_id, institution_key.id),
        )
        session.add(
            PatientKey(
                id=patient_key_id,
                institution_id=institution_id,
                institution_key_id=institution_key.id,
                wrapped_key=wrapped,
                created_at=now,
                destroyed_at=None,
            )
        )
        session.flush()
        return patient_key_id

    def _patient_key(self, session: Session, patient_key_id: str, institution_id: str | None) -> bytes:
        """Unwrap a patient key for one call; ``KeyShredded`` once it was destroyed."""
        found = session.execute(
            select(PatientKey, InstitutionKey)
            .join(InstitutionKey, PatientKey.institution_key_id == InstitutionKey.id)
            .where(PatientKey.id == patient_key_id)
        ).one_or_none()
        if found is None:
            raise KeyNotFound
        patient: PatientKey
        institution_key: InstitutionKey
        patient, institution_key = found
        if institution_id is not None and patient.institution_id != institution_id:
            raise KeyNotFound  # another tenant's key: indistinguishable from none
        if patient.wrapped_key is None:
            raise KeyShredded
        return self.rewrap_source_key(patient, institution_key)

    def rewrap_source_key(self, patient: PatientKey, institution_key: InstitutionKey) -> bytes:
        """The plaintext of ``patient`` (wrapped by ``institution_key``); for rotation too."""
        if patient.wrapped_key is None:
            raise KeyShredded
        try:
            return _open(
                self.unwrap_institution_key(institution_key),
                patient.wrapped_key,
                _patient_key_aad(patient.id, patient.institution_id, institution_key.id),
            )
        except InvalidTag:
            raise KeyIntegrityError from None

    def wrap_patient_key(
        self, patient_key: bytes, patient: PatientKey, institution_key: InstitutionKey
    ) -> bytes:
        """``patient_key`` wrapped by ``institution_key`` for the row ``patient`` (rotation)."""
        return _seal(
            self.unwrap_institution_key(institution_key),
            patient_key,
            _patient_key_aad(patient.id, patient.institution_id, institution_key.id),
        )

    def destroy_patient_key(
        self,
        session: Session,
        patient_key_id: str,
        *,
        actor: Subject,
        reason: PurgeReason,
        now: datetime,
    ) -> str:
        """Crypto-shred a patient: destroy the key, append to the purge ledger, audit it.

        Returns the ledger entry's id; destroying a destroyed key returns the same entry.
        An actor bound to an institution can only destroy that institution's keys.
        """
        patient = session.scalars(
            select(PatientKey).where(PatientKey.id == patient_key_id).with_for_update()
        ).first()
        if patient is None or (
            actor.institution_id is not None and actor.institution_id != patient.institution_id
        ):
            raise KeyNotFound
        if patient.wrapped_key is None:
            existing = session.scalar(
                select(PurgeLedgerEntry.id).where(PurgeLedgerEntry.patient_key_id == patient.id)
            )
            if existing is not None:
                return existing
        session.execute(
            update(PatientKey)
            .where(PatientKey.id == patient.id)
            .values(wrapped_key=None, destroyed_at=now)
            .execution_options(synchronize_session=False)
        )
        session.expire(patient)
        entry = PurgeLedgerEntry(
            id=new_id(),
            patient_key_id=patient.id,
            institution_id=patient.institution_id,
            destroyed_at=now,
            actor_type=actor.actor.type.value,
            actor_id=actor.actor.id[:64],
            reason=PurgeReason(reason).value,
        )
        session.add(entry)
        record(
            session,
            AuditAction.KEY_SHRED,
            actor,
            Target("patient_key", patient.id),
            Outcome.SUCCESS,
            now=now,
            institution_id=patient.institution_id,
        )
        session.flush()
        return entry.id

    # --- objects ------------------------------------------------------------------------

    def encrypt_object(
        self,
        store: ObjectStore,
        source: stream.ReadableStream,
        *,
        session: Session,
        context: ObjectContext,
        segment_size: int = stream.DEFAULT_SEGMENT_SIZE,
    ) -> EncryptedObject:
        """Encrypt everything ``source`` yields into a new object of ``store``, streaming.

        Memory stays at a few segments whatever the size. The object key is new and is
        returned; the object is bound to it and to the institution. For large uploads
        prefer ``prepare_object`` and write after the transaction: on SQLite an open
        transaction holds the database's single write lock for the whole upload.
        """
        pending = self.prepare_object(session, context)
        return pending.write(store, source, segment_size=segment_size)

    def prepare_object(self, session: Session, context: ObjectContext) -> PendingObject:
        """Choose the key of a new object and seal its DEK under the patient key.

        Needs the database only for the patient key; ``PendingObject.write`` then streams
        the object to the store without it (DESIGN §3: objects are written before the
        transaction that makes them visible).
        """
        object_key = new_object_key(context.kind)
        patient_key = self._patient_key(session, context.patient_key_id, context.institution_id)
        dek = os.urandom(stream.DEK_SIZE)
        wrapped_dek = _seal(
            _subkey(patient_key, b"object-dek"),
            dek,
            _dek_aad(object_key, context.institution_id, context.patient_key_id),
        )
        del patient_key
        return PendingObject(object_key, context, dek, wrapped_dek)

    def open_object(
        self, store: ObjectStore, key: str, *, session: Session, context: ObjectContext
    ) -> OpenedObject:
        """Open object ``key`` of ``context``'s patient for reading.

        Raises ``KeyShredded`` if the patient key was destroyed, ``KeyNotFound`` for a
        patient key of another institution, and ``ObjectIntegrityError`` (with a security
        alert) if the object is not the authentic object stored under ``key`` for them.
        """
        alarm = _Alarm(self, context.institution_id)
        source = _StoredObjectSource(store, key)
        try:
            header = _named_header(stream.read_header_from_range(source), context.patient_key_id)
        except ObjectIntegrityError:
            alarm(key)
            raise
        patient_key = self._patient_key(session, context.patient_key_id, context.institution_id)
        try:
            dek = _open(
                _subkey(patient_key, b"object-dek"),
                header.wrapped_dek,
                _dek_aad(key, context.institution_id, context.patient_key_id),
            )
        except InvalidTag:
            alarm(key)
            raise ObjectIntegrityError from None
        finally:
            del patient_key
        associated_data = _object_aad(key, context.institution_id)
        try:
            reader = stream.ObjectReader(source, dek, header=header, associated_data=associated_data)
        except ObjectIntegrityError:
            alarm(key)
            raise
        return OpenedObject(store, key, reader, dek, associated_data, alarm)

    # --- PHI fields ---------------------------------------------------------------------

    def encrypt_field(
        self, session: Session, patient_key_id: str, plaintext: str | bytes, *, aad: bytes
    ) -> bytes:
        """Encrypt one PHI value (UTF-8 if ``str``) under the patient's key, bound to ``aad``.

        ``aad`` names where the value lives (table, column, row id): the same bytes must
        be given to ``decrypt_field``.
        """
        data = plaintext.encode() if isinstance(plaintext, str) else plaintext
        patient_key = self._patient_key(session, patient_key_id, None)
        return _seal(_subkey(patient_key, b"phi-field"), data, _field_aad(patient_key_id, aad))

    def decrypt_field(self, session: Session, patient_key_id: str, sealed: bytes, *, aad: bytes) -> bytes:
        """The plaintext bytes of ``encrypt_field``; ``KeyShredded`` once the key was destroyed."""
        patient_key = self._patient_key(session, patient_key_id, None)
        try:
            return _open(_subkey(patient_key, b"phi-field"), sealed, _field_aad(patient_key_id, aad))
        except InvalidTag:
            raise ObjectIntegrityError from None

    def decrypt_fields(self, session: Session, fields: Sequence[SealedField]) -> list[bytes]:
        """``decrypt_field`` for many values, of any patients, in one query: each patient key
        is unwrapped once for the call and dropped (a page of search results, not one
        round trip per value). ``KeyShredded``/``KeyNotFound``/``ObjectIntegrityError`` as
        ``decrypt_field`` for the first value that fails.
        """
        wanted = sorted({field.patient_key_id for field in fields})
        found: dict[str, tuple[PatientKey, InstitutionKey]] = {}
        for start in range(0, len(wanted), _KEY_BATCH):
            rows = session.execute(
                select(PatientKey, InstitutionKey)
                .join(InstitutionKey, PatientKey.institution_key_id == InstitutionKey.id)
                .where(PatientKey.id.in_(wanted[start : start + _KEY_BATCH]))
            ).all()
            found.update({row[0].id: (row[0], row[1]) for row in rows})
        subkeys: dict[str, bytes] = {}
        plaintexts: list[bytes] = []
        try:
            for field in fields:
                subkey = subkeys.get(field.patient_key_id)
                if subkey is None:
                    pair = found.get(field.patient_key_id)
                    if pair is None:
                        raise KeyNotFound
                    subkey = _subkey(self.rewrap_source_key(*pair), b"phi-field")
                    subkeys[field.patient_key_id] = subkey
                try:
                    plaintexts.append(
                        _open(subkey, field.sealed, _field_aad(field.patient_key_id, field.aad))
                    )
                except InvalidTag:
                    raise ObjectIntegrityError from None
        finally:
            subkeys.clear()
        return plaintexts

    # --- alerts -------------------------------------------------------------------------

    def integrity_alarm(self, object_key: str, institution_id: str) -> None:
        """Log a security alert and audit it in a transaction of its own.

        The audit record is written from a thread: the failing request's transaction may
        still hold the database (SQLite allows one writer) and is about to roll back,
        which must not take the alert with it.
        """
        log.error(
            "security alert: object %s of institution %s failed its integrity check",
            object_key,
            institution_id,
        )
        if self._alarm_db is None:
            return
        thread = threading.Thread(
            target=self._record_alarm, args=(object_key, institution_id), name="integrity-alarm", daemon=True
        )
        with self._alarm_lock:
            self._alarm_threads = [t for t in self._alarm_threads if t.is_alive()]
            self._alarm_threads.append(thread)
        thread.start()

    def _record_alarm(self, object_key: str, institution_id: str) -> None:
        assert self._alarm_db is not None  # noqa: S101  # nosec B101  # checked by the caller
        try:
            with self._alarm_db.transaction() as session:
                record(
                    session,
                    AuditAction.OBJECT_INTEGRITY_FAILURE,
                    SystemSubject(_CRYPTO_ACTOR, institution_id),
                    Target("object", object_key),
                    Outcome.FAILURE,
                    now=self.clock.now(),
                )
        except Exception as exc:  # noqa: BLE001  # an alert must never crash the reader
            log.error("could not audit the integrity alert: %s", type(exc).__name__)  # noqa: TRY400

    def wait_for_alarms(self, timeout: float = 60.0) -> None:
        """Wait until the alerts raised so far are recorded (tests, shutdown)."""
        with self._alarm_lock:
            threads = list(self._alarm_threads)
        for thread in threads:
            thread.join(timeout)
