r"""Streaming authenticated encryption of stored objects (DICOM files, cine loops of GBs).

An object is cut into segments (chunks) of equal plaintext size that are sealed one by
one with AES-256-GCM, so neither side ever holds a whole object, and any byte range can
be decrypted by opening only the segments it overlaps (WADO-RS frame retrieval).

Construction
------------
The nonce scheme is STREAM, the segmented AEAD of

* V. T. Hoang, R. Reyhanitabar, P. Rogaway, D. Vizár, "Online Authenticated-Encryption
  and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015, LNCS 9215, pp. 493-517,
  https://eprint.iacr.org/2015/189 ("HRRV15"),

laid out exactly as in Google Tink's AES-GCM-HKDF streaming AEAD

* https://developers.google.com/tink/streaming-aead/aes_gcm_hkdf_streaming, whose
  security is analysed in V. T. Hoang, Y. Shen, "Security of Streaming Encryption in
  Google's Tink Library", ACM CCS 2020, https://eprint.iacr.org/2020/1019 ("HS20").

Each segment's nonce names its position and whether it is the final one, so reordered,
dropped, duplicated, truncated or appended segments fail authentication (HRRV15 prove
STREAM secure as a nonce-based online AE, their nOAE notion). All integers are big-endian::

    object   = header ‖ segment_0 ‖ … ‖ segment_{n-1}

    header   off  size  field
               0     8  magic 89 50 56 4F 0D 0A 1A 0A  ("\x89PVO\r\n\x1a\n")
               8     1  format version = 1
               9     2  H, length of the whole header in bytes (60 ≤ H ≤ 8192)
              11     4  S, plaintext bytes per segment (4 KiB ≤ S ≤ 16 MiB)
              15    32  salt, random per object (HKDF salt)
              47     7  nonce prefix, random per object
              54     1  K, number of key ids (1 ≤ K ≤ 8)
              55        K times (1-byte length L, 1 ≤ L ≤ 255; L bytes of UTF-8 key id)
               …     2  W, length of the wrapped DEK (1 ≤ W ≤ 2048)
               …     W  wrapped DEK, opaque to this module

    key      = HKDF-SHA256(IKM = DEK, salt = salt,
                           info = SHA-256(header) ‖ associated data, L = 32)   RFC 5869
    nonce_i  = nonce prefix ‖ uint32(i) ‖ (0x01 if i = n-1 else 0x00)        Tink layout
    segment_i = AES-256-GCM-Encrypt(key, nonce_i, M_i, AAD = empty)          SP 800-38D
              = ciphertext (|M_i| bytes) ‖ 16-byte tag

Every M_i has S bytes except the final one, which has 1..S bytes, or 0 bytes when it is
the only segment (an empty object). So segment i starts at H + i·(S + 16), and the
ciphertext length alone gives the plaintext length.

Differences from Tink, and why:

* The header carries key ids and the wrapped DEK, so a reader needs nothing but the
  object to find its key. The whole header is bound to every segment by hashing it into
  the HKDF info: changing any header byte changes the key, and every segment fails.
* Tink shortens its first segment so ciphertext segments align with the header; our
  header length varies, and equal plaintext segments keep range arithmetic trivial.

The magic follows PNG (ISO/IEC 15948 §5.2): the high-bit first byte and CR LF ^Z LF catch
7-bit and newline-translating transports. Every length in a header is bounded before use;
any malformed, tampered or foreign object raises ``ObjectIntegrityError`` and nothing else.

A fresh random 256-bit salt per object gives each object its own AES key, so the STREAM
nonces (a counter under that key) can never repeat, even if a DEK were ever reused; the
random nonce prefix is kept for fidelity with Tink's analysed layout (HS20).

API layers
----------
Public: ``encrypt_stream``/``iter_ciphertext`` (write), ``read_header`` then
``decrypt_stream``/``iter_plaintext`` (sequential read), ``ObjectReader`` (random access),
``plaintext_size``/``ciphertext_size``. Nothing public accepts a salt or nonce: each
encryption draws fresh ones, because a repeated (key, nonce) pair breaks GCM outright.
The segment cipher and framing (nonces, indices, final flags) are private "hazmat" below.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from phivault.crypto.errors import InvalidParameterError, ObjectIntegrityError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "DEK_SIZE",
    "FORMAT_VERSION",
    "MAX_HEADER_SIZE",
    "MAX_KEY_IDS",
    "MAX_KEY_ID_SIZE",
    "MAX_SEGMENT_SIZE",
    "MAX_WRAPPED_DEK_SIZE",
    "MIN_SEGMENT_SIZE",
    "EncryptedObjectInfo",
    "ObjectHeader",
    "ObjectReader",
    "RangeSource",
    "ReadableStream",
    "SeekableFile",
    "SeekableFileSource",
    "WritableStream",
    "ciphertext_size",
    "decrypt_stream",
    "encrypt_stream",
    "iter_ciphertext",
    "iter_plaintext",
    "plaintext_size",
    "read_header",
    "read_header_from_range",
]

FORMAT_VERSION: Final = 1
MAGIC: Final = b"\x89PVO\r\n\x1a\n"
DEK_SIZE: Final = 32  # AES-256: the DEK is HKDF input keying material of full strength
TAG_SIZE: Final = 16  # full 128-bit GCM tag; SP 800-38D Appendix C: shorter tags ease forgery
SALT_SIZE: Final = 32  # Tink: salt length = derived key length
NONCE_PREFIX_SIZE: Final = 7  # Tink: 12-byte GCM nonce = 7 prefix + 4 index + 1 flag

# 256 KiB, chosen with bench/crypto.py (docs/performance.md): throughput is on a plateau
# from 256 KiB to 1 MiB (encryption was up to ~15 % faster at 256-512 KiB than at 1 MiB in
# some runs: three 1 MiB buffers overflow a 2 MiB per-core L2) and falls off below 64 KiB
# and at 16 MiB. On the plateau the smallest wins, because a frame read fetches whole
# segments (a 900 KB ultrasound frame: at most 5 segments, 1.25 MiB, instead of 2 MiB).
# The 16-byte tag costs 0.006 %.
DEFAULT_SEGMENT_SIZE: Final = 256 << 10
MIN_SEGMENT_SIZE: Final = 4 << 10
# Bounds the buffers a hostile header can make a reader allocate (2 segments + 1 output);
# far below GCM's per-invocation limit of 2^39 - 256 bits (SP 800-38D §5.2.1.1).
MAX_SEGMENT_SIZE: Final = 16 << 20
MAX_KEY_IDS: Final = 8
MAX_KEY_ID_SIZE: Final = 255  # bytes of UTF-8; one length byte
MAX_WRAPPED_DEK_SIZE: Final = 2048  # room for RSA-OAEP-16384 or an OpenBao transit blob
MAX_HEADER_SIZE: Final = 8192
# The segment index is a uint32 in the nonce (Tink layout).
MAX_SEGMENTS: Final = 1 << 32

_PREAMBLE = struct.Struct(">8sBH")  # magic, version, header length H
_FIXED_FIELDS = struct.Struct(f">I{SALT_SIZE}s{NONCE_PREFIX_SIZE}sB")  # S, salt, prefix, K
_UINT8 = struct.Struct(">B")
_UINT16 = struct.Struct(">H")
_NONCE_SUFFIX = struct.Struct(">IB")  # segment index, final-segment flag
MIN_HEADER_SIZE: Final = _PREAMBLE.size + _FIXED_FIELDS.size + (1 + 1) + (2 + 1)
# One range request fetches the header in the common case (one key id, a short wrap).
_HEADER_PROBE_SIZE: Final = 512
# Upper bound on ciphertext fetched per range request by ObjectReader.iter_range.
_RANGE_READ_BUDGET: Final = 8 << 20


# --- I/O shapes --------------------------------------------------------------------------


class ReadableStream(Protocol):
    """Anything with ``read(n)``: an open file, ``io.BytesIO``, a socket file, a request body.

    If it also has ``readinto`` (as buffered files do), that is used to avoid an allocation
    per segment.
    """

    def read(self, size: int, /) -> bytes: ...


class WritableStream(Protocol):
    """Anything with ``write(buffer)`` that returns how many bytes it took."""

    def write(self, data: memoryview, /) -> int | None: ...


class RangeSource(Protocol):
    """Random access to ciphertext: an object store object, a file, a test double."""

    def size(self) -> int:
        """Return the total length of the ciphertext in bytes."""
        ...

    def read_range(self, start: int, length: int) -> bytes:
        """Return ``length`` bytes from ``start``; fewer only where the ciphertext ends."""
        ...


class SeekableFile(Protocol):
    """A seekable binary file, e.g. ``open(path, "rb")`` or ``io.BytesIO``."""

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def read(self, size: int, /) -> bytes: ...


# --- Header ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectHeader:
    """The plaintext, authenticated header of an encrypted object; nothing in it is secret.

    Get one from ``read_header``/``read_header_from_range`` (to find the key that unwraps
    ``wrapped_dek``) or from ``encrypt_stream``; construction validates every field.
    """

    segment_size: int
    key_ids: tuple[str, ...]
    wrapped_dek: bytes
    salt: bytes = field(repr=False)
    nonce_prefix: bytes = field(repr=False)
    version: int = FORMAT_VERSION
    _encoded: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_header_fields(self)
        object.__setattr__(self, "_encoded", _encode_header(self))

    def encode(self) -> bytes:
        """Return the header's bytes as stored, the input of the segment-key derivation."""
        return self._encoded

    @property
    def size(self) -> int:
        """H, the header's length in bytes; segment 0 starts here."""
        return len(self._encoded)


def _check_header_fields(header: ObjectHeader) -> None:
    """Raise ``InvalidParameterError`` unless every field fits the format's bounds."""
    if header.version != FORMAT_VERSION:
        msg = f"unsupported format version {header.version}"
        raise InvalidParameterError(msg)
    if not MIN_SEGMENT_SIZE <= header.segment_size <= MAX_SEGMENT_SIZE:
        msg = f"segment size must be {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE} bytes"
        raise InvalidParameterError(msg)
    if not isinstance(header.key_ids, tuple) or not 1 <= len(header.key_ids) <= MAX_KEY_IDS:
        msg = f"key_ids must be a tuple of 1..{MAX_KEY_IDS} strings"
        raise InvalidParameterError(msg)
    for key_id in header.key_ids:
        # Key ids end up in logs and key lookups: no control characters (log injection).
        if (
            not isinstance(key_id, str)
            or not key_id.isprintable()
            or not 1 <= len(key_id.encode()) <= MAX_KEY_ID_SIZE
        ):
            msg = f"each key id must be 1..{MAX_KEY_ID_SIZE} bytes of printable UTF-8"
            raise InvalidParameterError(msg)
    if not isinstance(header.wrapped_dek, bytes) or not (
        1 <= len(header.wrapped_dek) <= MAX_WRAPPED_DEK_SIZE
    ):
        msg = f"wrapped_dek must be 1..{MAX_WRAPPED_DEK_SIZE} bytes"
        raise InvalidParameterError(msg)
    if not isinstance(header.salt, bytes) or len(header.salt) != SALT_SIZE:
        msg = f"salt must be {SALT_SIZE} bytes"
        raise InvalidParameterError(msg)
    if not isinstance(header.nonce_prefix, bytes) or len(header.nonce_prefix) != NONCE_PREFIX_SIZE:
        msg = f"nonce prefix must be {NONCE_PREFIX_SIZE} bytes"
        raise InvalidParameterError(msg)


def _encode_header(header: ObjectHeader) -> bytes:
    key_id_fields = b"".join(
        _UINT8.pack(len(encoded)) + encoded for encoded in (k.encode() for k in header.key_ids)
    )
    body = b"".join(
        (
            _FIXED_FIELDS.pack(header.segment_size, header.salt, header.nonce_prefix, len(header.key_ids)),
            key_id_fields,
            _UINT16.pack(len(header.wrapped_dek)),
            header.wrapped_dek,
        )
    )
    # The field bounds keep this far under MAX_HEADER_SIZE; checked so the bound is a fact.
    length = _PREAMBLE.size + len(body)
    if length > MAX_HEADER_SIZE:  # pragma: no cover - unreachable with the bounds above
        msg = "header too large"
        raise InvalidParameterError(msg)
    return _PREAMBLE.pack(MAGIC, header.version, length) + body


def _header_length(preamble: bytes) -> int:
    """H from the first 11 bytes, after checking magic, version and bounds."""
    if len(preamble) != _PREAMBLE.size:
        raise ObjectIntegrityError
    magic, version, length = _PREAMBLE.unpack(preamble)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise ObjectIntegrityError
    if not MIN_HEADER_SIZE <= length <= MAX_HEADER_SIZE:
        raise ObjectIntegrityError
    return int(length)


class _HeaderCursor:
    """Reads fields off untrusted header bytes; running past the end is an integrity error."""

    __slots__ = ("_data", "_offset")

    def __init__(self, data: bytes, offset: int) -> None:
        self._data = data
        self._offset = offset

    def take(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._data):
            raise ObjectIntegrityError
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[int | bytes, ...]:
        values: tuple[int | bytes, ...] = layout.unpack(self.take(layout.size))
        return values

    def uint(self, layout: struct.Struct) -> int:
        (value,) = self.unpack(layout)
        return int(value)

    def at_end(self) -> bool:
        return self._offset == len(self._data)


def _parse_header(encoded: bytes) -> ObjectHeader:
    """Parse exactly one header (its length already checked by ``_header_length``)."""
    cursor = _HeaderCursor(encoded, _PREAMBLE.size)
    segment_size, salt, nonce_prefix, key_id_count = cursor.unpack(_FIXED_FIELDS)
    if not isinstance(key_id_count, int) or not 1 <= key_id_count <= MAX_KEY_IDS:
        raise ObjectIntegrityError
    try:
        key_ids = tuple(
            cursor.take(cursor.uint(_UINT8)).decode("utf-8", errors="strict") for _ in range(key_id_count)
        )
        wrapped_dek = cursor.take(cursor.uint(_UINT16))
        if not cursor.at_end():
            raise ObjectIntegrityError
        header = ObjectHeader(
            segment_size=int(segment_size),
            key_ids=key_ids,
            wrapped_dek=wrapped_dek,
            salt=bytes(salt),
            nonce_prefix=bytes(nonce_prefix),
        )
    except (TypeError, ValueError):  # includes UnicodeDecodeError and InvalidParameterError
        raise ObjectIntegrityError from None
    # The segment key is derived from the re-encoded header, so it must be these very
    # bytes; otherwise a byte the fields do not capture would escape authentication.
    if header.encode() != encoded:
        raise ObjectIntegrityError
    return header


def read_header(stream: ReadableStream) -> ObjectHeader:
    """Read and parse the header at the start of ``stream``, leaving it at segment 0.

    The header is not authenticated yet (that happens with the first segment, whose key
    depends on every header byte); it is only used to find the key that unwraps the DEK.
    """
    preamble = _read_exactly(stream, _PREAMBLE.size)
    length = _header_length(preamble)
    return _parse_header(preamble + _read_exactly(stream, length - _PREAMBLE.size))


def read_header_from_range(source: RangeSource) -> ObjectHeader:
    """``read_header`` for random-access ciphertext, usually in a single range read."""
    total = source.size()
    probe = source.read_range(0, min(total, _HEADER_PROBE_SIZE))
    length = _header_length(probe[: _PREAMBLE.size])
    if length > total:
        raise ObjectIntegrityError
    if length > len(probe):
        probe += source.read_range(len(probe), length - len(probe))
    if len(probe) < length:
        raise ObjectIntegrityError
    return _parse_header(probe[:length])


# --- Sizes -------------------------------------------------------------------------------


def _segment_count(plaintext_length: int, segment_size: int) -> int:
    # An empty object is still one (empty, final) segment, so truncation to nothing fails.
    return max(1, -(-plaintext_length // segment_size))


def ciphertext_size(header: ObjectHeader, plaintext_length: int) -> int:
    """Return the stored size of an object of ``plaintext_length`` bytes under ``header``."""
    if plaintext_length < 0:
        msg = "plaintext length must not be negative"
        raise InvalidParameterError(msg)
    segments = _segment_count(plaintext_length, header.segment_size)
    if segments > MAX_SEGMENTS:
        msg = "object has too many segments for its segment size"
        raise InvalidParameterError(msg)
    return header.size + plaintext_length + segments * TAG_SIZE


def plaintext_size(header: ObjectHeader, ciphertext_length: int) -> int:
    """Return the plaintext length a ciphertext length implies; refuse impossible lengths.

    The result is only as trustworthy as ``ciphertext_length`` until the final segment
    has been authenticated (its flag proves nothing follows it).
    """
    body = ciphertext_length - header.size
    if body < TAG_SIZE:
        raise ObjectIntegrityError
    full_segments, rest = divmod(body, header.segment_size + TAG_SIZE)
    if rest == 0:
        segments = full_segments
    elif rest < TAG_SIZE or (rest == TAG_SIZE and full_segments > 0):
        # A bare tag, or an empty final segment after full ones: the encoder never writes
        # either, so each encoding has exactly one length.
        raise ObjectIntegrityError
    else:
        segments = full_segments + 1
    if segments > MAX_SEGMENTS:
        raise ObjectIntegrityError
    return body - segments * TAG_SIZE


# --- Hazmat: segment cipher and framing ---------------------------------------------------


class _SegmentCipher:
    """AES-256-GCM under the per-object key, with STREAM nonces (Tink layout)."""

    __slots__ = ("_aead", "_nonce_prefix")

    def __init__(self, dek: bytes, header: ObjectHeader, associated_data: bytes) -> None:
        if not isinstance(dek, bytes) or len(dek) != DEK_SIZE:
            msg = f"the DEK must be {DEK_SIZE} bytes"
            raise InvalidParameterError(msg)
        if not isinstance(associated_data, bytes):
            msg = "associated data must be bytes"
            raise InvalidParameterError(msg)
        # RFC 5869: the salt makes the key unique per object; the info binds the key to
        # the header (fixed 32-byte digest first, so the concatenation is unambiguous)
        # and to the caller's associated data, as Tink binds its associated data.
        info = hashlib.sha256(header.encode()).digest() + associated_data
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=header.salt, info=info).derive(dek)
        self._aead = AESGCM(key)
        self._nonce_prefix = header.nonce_prefix

    def _nonce(self, index: int, *, final: bool) -> bytes:
        return self._nonce_prefix + _NONCE_SUFFIX.pack(index, 0x01 if final else 0x00)

    def seal_into(self, index: int, plaintext: memoryview, out: memoryview, *, final: bool) -> None:
        """Encrypt segment ``index`` into ``out`` (exactly ``len(plaintext) + 16`` bytes)."""
        self._aead.encrypt_into(self._nonce(index, final=final), plaintext, None, out)

    def seal(self, index: int, plaintext: memoryview, *, final: bool) -> bytes:
        return self._aead.encrypt(self._nonce(index, final=final), plaintext, None)

    def open_into(self, index: int, sealed: memoryview, out: memoryview, *, final: bool) -> None:
        """Decrypt segment ``index`` into ``out``.

        On failure ``out`` holds unauthenticated bytes (OpenSSL decrypts before it checks
        the tag); callers only pass private buffers and drop them when this raises.
        """
        try:
            self._aead.decrypt_into(self._nonce(index, final=final), sealed, None, out)
        except InvalidTag:
            raise ObjectIntegrityError from None

    def open(self, index: int, sealed: memoryview, *, final: bool) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(index, final=final), sealed, None)
        except InvalidTag:
            raise ObjectIntegrityError from None


def _read_exactly(stream: ReadableStream, size: int) -> bytes:
    """``size`` bytes from ``stream``; running out first is an integrity error."""
    data = stream.read(size)
    if len(data) == size:
        return data
    if len(data) > size:
        raise _overlong_read()
    if not data:
        raise ObjectIntegrityError
    buffer = bytearray(size)
    buffer[: len(data)] = data
    if len(data) + _fill(_readinto_of(stream), memoryview(buffer)[len(data) :]) != size:
        raise ObjectIntegrityError
    return bytes(buffer)


def _overlong_read() -> InvalidParameterError:
    return InvalidParameterError("the stream returned more bytes than were asked for")


def _readinto_of(stream: ReadableStream) -> Callable[[memoryview], int | None]:
    """``stream.readinto`` if it has one, else an equivalent built on ``read``."""
    readinto: Callable[[memoryview], int | None] | None = getattr(stream, "readinto", None)
    if readinto is not None:
        return readinto

    def read_into(view: memoryview) -> int:
        chunk = stream.read(len(view))
        if len(chunk) > len(view):
            raise _overlong_read()
        view[: len(chunk)] = chunk
        return len(chunk)

    return read_into


def _fill(readinto: Callable[[memoryview], int | None], view: memoryview) -> int:
    """Fill ``view`` completely unless the stream ends first; return the bytes read.

    Streams may return short reads (pipes, sockets, raw files) long before their end, and
    segment boundaries must not depend on that.
    """
    filled = 0
    while filled < len(view):
        count = readinto(view[filled:])
        if count is None:
            msg = "non-blocking streams are not supported"
            raise InvalidParameterError(msg)
        if count == 0:
            break
        filled += count
    return filled


def _plaintext_segments(source: ReadableStream, segment_size: int) -> Iterator[tuple[int, bool, memoryview]]:
    """Cut ``source`` into (index, final, plaintext) segments, reading one segment ahead.

    The read-ahead is how STREAM learns which segment is final without knowing the size.
    Each view is only valid until the next item is requested (buffers are reused).
    """
    readinto = _readinto_of(source)
    current, following = memoryview(bytearray(segment_size)), memoryview(bytearray(segment_size))
    length = _fill(readinto, current)
    index = 0
    while True:
        next_length = _fill(readinto, following) if length == segment_size else 0
        final = next_length == 0
        if index >= MAX_SEGMENTS:
            msg = "object has too many segments for its segment size"
            raise InvalidParameterError(msg)
        yield index, final, current[:length]
        if final:
            return
        current, following = following, current
        length = next_length
        index += 1


def _sealed_segments(source: ReadableStream, segment_size: int) -> Iterator[tuple[int, bool, memoryview]]:
    """Cut stored ciphertext into (index, final, sealed segment), reading one ahead.

    Applies the framing rules a canonical encoder obeys (no partial tag, no empty final
    segment after full ones); each view is valid until the next item is requested.
    """
    readinto = _readinto_of(source)
    sealed_size = segment_size + TAG_SIZE
    current, following = memoryview(bytearray(sealed_size)), memoryview(bytearray(sealed_size))
    length = _fill(readinto, current)
    index = 0
    while True:
        next_length = _fill(readinto, following) if length == sealed_size else 0
        final = next_length == 0
        if length < TAG_SIZE or (final and length == TAG_SIZE and index > 0):
            raise ObjectIntegrityError
        if index >= MAX_SEGMENTS:
            raise ObjectIntegrityError
        yield index, final, current[:length]
        if final:
            return
        current, following = following, current
        length = next_length
        index += 1


def _write_all(sink: WritableStream, data: memoryview) -> None:
    # io.RawIOBase.write may take only part of a buffer; io.BufferedIOBase takes all.
    while data:
        written = sink.write(data)
        if written is None:
            msg = "non-blocking sinks are not supported"
            raise InvalidParameterError(msg)
        data = data[written:]


def _new_header(*, segment_size: int, key_ids: Sequence[str], wrapped_dek: bytes) -> ObjectHeader:
    """Build a header with a fresh random salt and nonce prefix, as production always must."""
    if isinstance(key_ids, str):
        msg = "key_ids must be a sequence of key ids, not one string"
        raise InvalidParameterError(msg)
    return ObjectHeader(
        segment_size=segment_size,
        key_ids=tuple(key_ids),
        wrapped_dek=wrapped_dek,
        salt=os.urandom(SALT_SIZE),
        nonce_prefix=os.urandom(NONCE_PREFIX_SIZE),
    )


# --- Encryption --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncryptedObjectInfo:
    """What ``encrypt_stream`` wrote: the header and both lengths in bytes."""

    header: ObjectHeader
    plaintext_size: int
    ciphertext_size: int


def encrypt_stream(
    source: ReadableStream,
    sink: WritableStream,
    *,
    dek: bytes,
    key_ids: Sequence[str],
    wrapped_dek: bytes,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    associated_data: bytes = b"",
) -> EncryptedObjectInfo:
    """Encrypt everything ``source`` yields into ``sink`` as one object, segment by segment.

    ``dek`` is a fresh 32-byte data key for this object alone; ``key_ids`` and
    ``wrapped_dek`` (that DEK wrapped by the named key) are stored in the header as given.
    ``associated_data``, if any, must be given again to decrypt (e.g. the object's storage
    key, so an object cannot be swapped for another); it is not stored.
    """
    header = _new_header(segment_size=segment_size, key_ids=key_ids, wrapped_dek=wrapped_dek)
    return _encrypt_under_header(source, sink, header, dek, associated_data)


def _encrypt_under_header(
    source: ReadableStream,
    sink: WritableStream,
    header: ObjectHeader,
    dek: bytes,
    associated_data: bytes,
) -> EncryptedObjectInfo:
    """Encrypt with a given header (fixed salt and nonce prefix).

    Only for ``encrypt_stream`` and known-answer tests: reusing a header with the same DEK
    reuses GCM nonces under one key, which reveals plaintext XORs and forges tags.
    """
    cipher = _SegmentCipher(dek, header, associated_data)
    encoded = header.encode()
    _write_all(sink, memoryview(encoded))
    sealed = memoryview(bytearray(header.segment_size + TAG_SIZE))
    plaintext_length = 0
    for index, final, plaintext in _plaintext_segments(source, header.segment_size):
        out = sealed[: len(plaintext) + TAG_SIZE]
        cipher.seal_into(index, plaintext, out, final=final)
        _write_all(sink, out)
        plaintext_length += len(plaintext)
    return EncryptedObjectInfo(
        header=header,
        plaintext_size=plaintext_length,
        ciphertext_size=ciphertext_size(header, plaintext_length),
    )


def iter_ciphertext(
    source: ReadableStream,
    *,
    dek: bytes,
    key_ids: Sequence[str],
    wrapped_dek: bytes,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    associated_data: bytes = b"",
) -> Iterator[bytes]:
    """``encrypt_stream`` as a pull: the header's bytes, then one item per sealed segment.

    For consumers that pull (an object store ``put``, a multipart upload). Each item is a
    new ``bytes`` the consumer may keep.
    """
    header = _new_header(segment_size=segment_size, key_ids=key_ids, wrapped_dek=wrapped_dek)
    cipher = _SegmentCipher(dek, header, associated_data)
    yield header.encode()
    for index, final, plaintext in _plaintext_segments(source, header.segment_size):
        yield cipher.seal(index, plaintext, final=final)


# --- Sequential decryption ---------------------------------------------------------------


def iter_plaintext(
    source: ReadableStream,
    *,
    header: ObjectHeader,
    dek: bytes,
    associated_data: bytes = b"",
) -> Iterator[bytes]:
    """Decrypt the segments that follow the header in ``source``, one ``bytes`` each.

    Every item is authentic (right key, right position), but the object is only known
    to be complete when the iterator ends without ``ObjectIntegrityError``: a consumer
    must not act on "the whole object" before that (a truncated one fails at its end).
    """
    cipher = _SegmentCipher(dek, header, associated_data)
    for index, final, sealed in _sealed_segments(source, header.segment_size):
        yield cipher.open(index, sealed, final=final)


def decrypt_stream(
    source: ReadableStream,
    sink: WritableStream,
    *,
    header: ObjectHeader,
    dek: bytes,
    associated_data: bytes = b"",
) -> int:
    """Decrypt the segments that follow the header in ``source`` into ``sink``.

    Returns the plaintext length. As with ``iter_plaintext``, what was written is only
    known to be the complete object once this returns; on ``ObjectIntegrityError`` the
    caller must discard everything written so far.
    """
    cipher = _SegmentCipher(dek, header, associated_data)
    opened = memoryview(bytearray(header.segment_size))
    plaintext_length = 0
    for index, final, sealed in _sealed_segments(source, header.segment_size):
        out = opened[: len(sealed) - TAG_SIZE]
        cipher.open_into(index, sealed, out, final=final)
        _write_all(sink, out)
        plaintext_length += len(out)
    return plaintext_length


# --- Random access -----------------------------------------------------------------------


class ObjectReader:
    """Decrypt any byte range of an object by fetching and opening only its segments.

    Each range read authenticates the segments it touches, including their positions;
    a range that reaches the end of the object also authenticates the final segment's
    flag, and so the object's length. Segments a read does not touch are not checked: a
    range read proves that range, not the whole object. Safe to share between threads
    if ``source`` is (the cipher holds no per-call state).
    """

    __slots__ = ("_cipher", "_final_index", "_header", "_plaintext_size", "_source")

    def __init__(
        self,
        source: RangeSource,
        dek: bytes,
        *,
        header: ObjectHeader | None = None,
        associated_data: bytes = b"",
    ) -> None:
        """Open ``source`` with ``dek``; pass the ``header`` already read to save a fetch."""
        self._source = source
        self._header = header if header is not None else read_header_from_range(source)
        self._cipher = _SegmentCipher(dek, self._header, associated_data)
        self._plaintext_size = plaintext_size(self._header, source.size())
        self._final_index = _segment_count(self._plaintext_size, self._header.segment_size) - 1

    @property
    def header(self) -> ObjectHeader:
        return self._header

    @property
    def plaintext_size(self) -> int:
        """The plaintext length implied by the ciphertext length (see ``plaintext_size``)."""
        return self._plaintext_size

    def read(self, offset: int, length: int) -> bytes:
        """Plaintext bytes ``[offset, offset + length)``; the range must lie in the object."""
        return b"".join(self.iter_range(offset, length))

    def iter_range(self, offset: int, length: int) -> Iterator[bytes]:
        """Plaintext ``[offset, offset + length)`` in pieces, for ranges too big to hold.

        Ciphertext is fetched in runs of whole segments, at most ~8 MiB per range read.
        """
        if offset < 0 or length < 0 or offset + length > self._plaintext_size:
            msg = "range lies outside the object"
            raise InvalidParameterError(msg)
        segment_size = self._header.segment_size
        end = offset + length
        if end == self._plaintext_size:
            # A range that reaches the end opens the final segment, even when empty: its
            # flag proves nothing was cut off, so the object's length is authenticated too.
            first, last = min(offset // segment_size, self._final_index), self._final_index
        elif length == 0:
            return
        else:
            first, last = offset // segment_size, (end - 1) // segment_size
        per_fetch = max(1, _RANGE_READ_BUDGET // (segment_size + TAG_SIZE))
        for run_first in range(first, last + 1, per_fetch):
            run_last = min(run_first + per_fetch - 1, last)
            fetch_start = self._sealed_start(run_first)
            fetch_length = self._sealed_start(run_last) + self._sealed_length(run_last) - fetch_start
            fetched = memoryview(self._source.read_range(fetch_start, fetch_length))
            if len(fetched) != fetch_length:
                raise ObjectIntegrityError
            for index in range(run_first, run_last + 1):
                at = self._sealed_start(index) - fetch_start
                sealed = fetched[at : at + self._sealed_length(index)]
                plaintext = self._cipher.open(index, sealed, final=index == self._final_index)
                segment_start = index * segment_size
                low = max(offset, segment_start) - segment_start
                high = min(end, segment_start + len(plaintext)) - segment_start
                if high > low:
                    yield plaintext if (low, high) == (0, len(plaintext)) else plaintext[low:high]

    def _sealed_start(self, index: int) -> int:
        return self._header.size + index * (self._header.segment_size + TAG_SIZE)

    def _sealed_length(self, index: int) -> int:
        segment_size = self._header.segment_size
        if index < self._final_index:
            return segment_size + TAG_SIZE
        return self._plaintext_size - index * segment_size + TAG_SIZE


class SeekableFileSource:
    """A ``RangeSource`` over a seekable binary file; not for concurrent use (it seeks)."""

    __slots__ = ("_file",)

    def __init__(self, file: SeekableFile) -> None:
        self._file = file

    def size(self) -> int:
        return self._file.seek(0, os.SEEK_END)

    def read_range(self, start: int, length: int) -> bytes:
        self._file.seek(start, os.SEEK_SET)
        data = self._file.read(length)
        if len(data) == length or not data:
            return data
        # Short read before the end (raw files may do this): keep reading.
        parts = [data]
        remaining = length - len(data)
        while remaining:
            chunk = self._file.read(remaining)
            if not chunk:
                break
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)
