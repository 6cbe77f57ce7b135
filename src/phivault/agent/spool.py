r"""The local spool: exams queued on the device, encrypted, until the server confirms them.

Each queued file is copied into ``spool/<id>.pvs``, encrypted with AES-256-GCM under a key
derived from the device-local spool key (``spool.key``, 0600) for that item alone; its
record (``spool/<id>.json``) holds no PHI: sizes, digests, states, receipts.

Encrypted file format (the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár,
CRYPTO 2015, as Tink's streaming AEAD uses it; the server's objects use the same)::

    header   magic "PVSPOOL\x01" (8) ‖ uint32 segment size S ‖ salt (32) ‖ nonce prefix (7)
    key      HKDF-SHA256(spool key, salt, info = "phivault-agent/spool/" ‖ item id)
    segment  AES-256-GCM(key, nonce prefix ‖ uint32 i ‖ final flag, M_i, AAD = header)

so a segment cannot be moved, dropped, or the file cut short or extended unnoticed; any
segment decrypts alone, which lets an upload resume at any offset.

Crash safety: an item's file is complete before its record exists (an ``add`` that died
leaves a file without a record, removed later); a confirmed item's record is written
before its file is deleted. Nothing unconfirmed is ever removed without ``purge``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from phivault.agent.files import atomic_writer, private_directory, remove, stray_temporaries, write_private

MAGIC: Final = b"PVSPOOL\x01"
SEGMENT: Final = 1 << 20
TAG: Final = 16
_HEADER: Final = struct.Struct(">8sI32s7s")
KEY_BYTES: Final = 32


class SpoolError(Exception):
    """A spool file or record is damaged or was tampered with."""


class State:
    QUEUED = "queued"  # waiting; ``upload_url`` set once an upload was opened for it
    CONFIRMED = "confirmed"  # the server's receipt digest matched; the local copy is gone
    REJECTED = "rejected"  # the server refused the content (a DICOM rule); kept until purged


@dataclass(frozen=True)
class Item:
    id: str
    added_at: str
    size: int
    sha256: str
    state: str = State.QUEUED
    upload_url: str | None = None
    attempts: int = 0
    last_error: str | None = None
    confirmed_at: str | None = None
    receipt: dict[str, Any] | None = None
    rejected_code: str | None = None

    @property
    def added(self) -> datetime:
        return datetime.fromisoformat(self.added_at)

    @property
    def confirmed(self) -> datetime | None:
        return datetime.fromisoformat(self.confirmed_at) if self.confirmed_at else None

    def but(self, **changes: Any) -> Item:  # noqa: ANN401  # the fields of the record
        return replace(self, **changes)


def _segments(size: int) -> int:
    return max(1, -(-size // SEGMENT))


class _Cipher:
    def __init__(self, spool_key: bytes, item_id: str, header: bytes) -> None:
        _, _, salt, prefix = _HEADER.unpack(header)
        self.prefix: bytes = prefix
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=salt, info=b"phivault-agent/spool/" + item_id.encode()
        ).derive(spool_key)
        self.aead = AESGCM(key)
        self.header = header

    def nonce(self, index: int, *, final: bool) -> bytes:
        return self.prefix + struct.pack(">I", index) + (b"\x01" if final else b"\x00")

    def seal(self, index: int, data: bytes, *, final: bool) -> bytes:
        return self.aead.encrypt(self.nonce(index, final=final), data, self.header)

    def open(self, index: int, data: bytes, *, final: bool) -> bytes:
        try:
            return self.aead.decrypt(self.nonce(index, final=final), data, self.header)
        except InvalidTag:
            raise SpoolError("a spool file failed its integrity check") from None


class Spool:
    def __init__(self, directory: Path, key_file: Path) -> None:
        self.directory = directory
        self.key_file = key_file

    def prepare(self) -> None:
        private_directory(self.directory)
        if not self.key_file.exists():
            write_private(self.key_file, os.urandom(KEY_BYTES))
        for stray in stray_temporaries(self.directory):
            stray.unlink(missing_ok=True)
        for blob in self.directory.glob("*.pvs"):
            if not self._record_path(blob.stem).exists():
                remove(blob)  # an add that did not finish: the caller still has the file

    def _key(self) -> bytes:
        key = self.key_file.read_bytes()
        if len(key) != KEY_BYTES:
            raise SpoolError(f"{self.key_file} is not a spool key")
        return key

    def _record_path(self, item_id: str) -> Path:
        return self.directory / f"{item_id}.json"

    def blob_path(self, item_id: str) -> Path:
        return self.directory / f"{item_id}.pvs"

    # -- adding ------------------------------------------------------------------------------

    def add(self, source: BinaryIO, now: datetime) -> Item:
        """Copy ``source`` into the spool, encrypted; returns its record."""
        item_id = uuid.uuid4().hex
        header = _HEADER.pack(MAGIC, SEGMENT, os.urandom(32), os.urandom(7))
        cipher = _Cipher(self._key(), item_id, header)
        digest = hashlib.sha256()
        size = 0
        with atomic_writer(self.blob_path(item_id)) as out:
            out.write(header)
            index = 0
            block = source.read(SEGMENT)
            while True:
                following = source.read(SEGMENT) if len(block) == SEGMENT else b""
                digest.update(block)
                size += len(block)
                out.write(cipher.seal(index, block, final=not following))
                if not following:
                    break
                block, index = following, index + 1
        item = Item(id=item_id, added_at=now.isoformat(), size=size, sha256=digest.hexdigest())
        self.save(item)
        return item

    # -- reading -------------------------------------------------------------------------------

    def read(self, item: Item, offset: int, length: int) -> bytes:
        """Plaintext ``[offset, offset + length)`` of a queued item, authenticated."""
        return b"".join(self.iter_range(item, offset, length))

    def iter_range(self, item: Item, offset: int, length: int) -> Iterator[bytes]:
        """Plaintext ``[offset, offset + length)`` a segment at a time (memory stays at one
        segment whatever the length); every piece authenticated before it is yielded.
        """
        if offset < 0 or length < 0 or offset + length > item.size:
            msg = "range outside the item"
            raise ValueError(msg)
        total = _segments(item.size)
        first = min(offset // SEGMENT, total - 1)
        last = total - 1 if offset + length >= item.size else (offset + length - 1) // SEGMENT
        with self.blob_path(item.id).open("rb") as handle:
            header = handle.read(_HEADER.size)
            if len(header) != _HEADER.size or header[:8] != MAGIC:
                raise SpoolError("not a spool file")
            cipher = _Cipher(self._key(), item.id, header)
            expected = (
                _HEADER.size + (total - 1) * (SEGMENT + TAG) + (item.size - (total - 1) * SEGMENT) + TAG
            )
            if os.fstat(handle.fileno()).st_size != expected:
                raise SpoolError("a spool file has the wrong length")
            handle.seek(_HEADER.size + first * (SEGMENT + TAG))
            end = offset + length
            for index in range(first, last + 1):
                start = index * SEGMENT
                plain = min(SEGMENT, item.size - start)
                data = cipher.open(index, handle.read(plain + TAG), final=index == total - 1)
                piece = data[max(0, offset - start) : min(plain, end - start)]
                if piece:
                    yield piece

    def verify(self, item: Item) -> bool:
        """Decrypt the whole item and compare its digest with the record's."""
        digest = hashlib.sha256()
        for offset in range(0, max(item.size, 1), SEGMENT):
            digest.update(self.read(item, offset, min(SEGMENT, item.size - offset)))
        return digest.hexdigest() == item.sha256

    # -- records -------------------------------------------------------------------------------

    def save(self, item: Item) -> None:
        write_private(self._record_path(item.id), json.dumps(asdict(item), sort_keys=True).encode())

    def items(self) -> list[Item]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = json.loads(path.read_bytes())
                found.append(Item(**data))
            except (OSError, ValueError, TypeError) as exc:
                raise SpoolError(f"the spool record {path.name} cannot be read") from exc
        return sorted(found, key=lambda item: (item.added_at, item.id))

    def get(self, item_id: str) -> Item | None:
        return next((item for item in self.items() if item.id == item_id), None)

    def confirm(self, item: Item, receipt: dict[str, Any], now: datetime) -> Item:
        """The server's digest matched: record it, then delete the local copy."""
        confirmed = item.but(
            state=State.CONFIRMED,
            receipt=receipt,
            confirmed_at=now.isoformat(),
            upload_url=None,
            last_error=None,
        )
        self.save(confirmed)
        remove(self.blob_path(item.id))
        return confirmed

    def forget(self, item: Item) -> None:
        """Remove an item and its local copy (``purge``, or a confirmed record past retention)."""
        remove(self.blob_path(item.id))
        remove(self._record_path(item.id))

    def tidy(self, now: datetime, retain: timedelta) -> int:
        """Delete leftover copies of confirmed items and confirmed records older than
        ``retain``; returns how many records went. Unconfirmed items are never touched.
        """
        forgotten = 0
        for item in self.items():
            if item.state != State.CONFIRMED:
                continue
            if self.blob_path(item.id).exists():
                remove(self.blob_path(item.id))  # confirmed just before a crash
            confirmed = item.confirmed
            if confirmed is not None and now - confirmed > retain:
                self.forget(item)
                forgotten += 1
        return forgotten

    def pending(self) -> Iterator[Item]:
        return (item for item in self.items() if item.state == State.QUEUED)


def utcnow() -> datetime:
    return datetime.now(UTC)
