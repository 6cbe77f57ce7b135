"""PS3.10 files written with the value of Pixel Data streamed from the received bytes.

An instance's Pixel Data (7FE0,0010) is nearly all of its size (a 1 GiB ultrasound cine is
1 GiB of it), so ingest never holds it: the value stays where it was received
(:class:`PixelDataSpan`), and the de-identified file is produced while it is encrypted.

How, without writing PS3.10 a second time: pydicom 3 writes an OB/OW value given as a
buffer (``io.BufferedIOBase``) by reading it in pieces (``filewriter.write_OBvalue``), and
takes its length from the buffer. :class:`StreamedPixelData` is such a buffer of the value's
length whose reads return *markers* instead of bytes; :func:`encode` lets pydicom write the
data set into a sink that keeps every piece pydicom writes (preamble, File Meta, the elements
before and after Pixel Data, the element's own header, the Sequence Delimitation Item of
encapsulated data) and notes where the value goes. Reading the result yields those pieces
with the value streamed in between, frame by frame through any transform (pixel rules), so
the bytes are exactly those pydicom writes for the same value given as ``bytes``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO, Final, Protocol

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

PIXEL_DATA: Final = 0x7FE00010
_COPY_BLOCK: Final = 1024 * 1024
# pydicom checks the first item tag of encapsulated data itself (filewriter, PS3.5 A.4):
# reads this short at the very start get the real bytes.
_HEAD_SIZE: Final = 8


class ReadableStream(Protocol):
    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class PixelDataSpan:
    """Where the received value of the top-level Pixel Data element lies: ``length`` bytes
    from ``offset`` in ``stream`` (for encapsulated data the items, without the Sequence
    Delimitation Item), and the VR pydicom gives the element.
    """

    stream: BinaryIO
    offset: int
    length: int
    vr: str

    def read_all(self) -> bytes:
        """The whole value in memory (only where a codec needs it, e.g. RLE re-encoding)."""
        self.stream.seek(self.offset)
        data = self.stream.read(self.length)
        if len(data) != self.length:
            raise EOFError("the Pixel Data value ends early")
        return data


class FrameTransform(Protocol):
    """Changes native pixel data frame by frame (pixel rules), in place."""

    @property
    def frame_size(self) -> int:
        """Bytes per frame."""
        ...

    @property
    def frames(self) -> int:
        """Frames to transform from the value's start; bytes after them pass unchanged."""
        ...

    def __call__(self, frame: bytearray) -> None: ...


@dataclass(frozen=True, slots=True)
class _ValueRun:
    """A marker for ``count`` bytes of the value, written by pydicom in place of them."""

    count: int

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0


class StreamedPixelData(io.BufferedIOBase):
    """The value of Pixel Data as pydicom sees it while :func:`encode` writes it.

    The length includes the pad byte pydicom adds to an odd-length value given as bytes
    (PS3.5 §7.1.1: values have even length), so the element's length field is the same too.
    Its reads return markers; :meth:`open` gives the real bytes.
    """

    def __init__(self, span: PixelDataSpan) -> None:
        super().__init__()
        self.span = span
        self.transform: FrameTransform | None = None
        self._length = span.length + span.length % 2
        self._position = 0
        span.stream.seek(span.offset)
        self._head = span.stream.read(min(_HEAD_SIZE, span.length))

    @property
    def length(self) -> int:
        """The received value's length (without padding)."""
        return self.span.length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = min(max(base + offset, 0), self._length)
        return self._position

    def read(self, size: int | None = -1, /) -> bytes:
        remaining = self._length - self._position
        count = remaining if size is None or size < 0 else min(size, remaining)
        start = self._position
        self._position += count
        if start + count <= len(self._head):
            return self._head[start : start + count]
        # Only pydicom's writer reads this object: the sink takes the marker for the bytes.
        return _ValueRun(count)  # type: ignore[return-value]

    def open(self) -> ReadableStream:
        """The value's bytes, transformed and padded as written, read front to back once."""
        return _ValueReader(self.span, self.transform, self._length)


class _ValueReader:
    """Reads the span from its stream, frame by frame through the transform, then pads."""

    def __init__(self, span: PixelDataSpan, transform: FrameTransform | None, length: int) -> None:
        self._stream = span.stream
        self._left = span.length  # bytes still to take from the stream
        self._pad = length - span.length
        self._transform = transform
        self._frames_left = 0 if transform is None else transform.frames
        self._pending = memoryview(b"")
        span.stream.seek(span.offset)

    def read(self, size: int = -1, /) -> bytes:
        wanted = size if size >= 0 else self._left + self._pad + len(self._pending)
        out: list[bytes] = []
        while wanted > 0:
            if not self._pending and not self._refill():
                break
            take = self._pending[:wanted]
            out.append(bytes(take))
            self._pending = self._pending[len(take) :]
            wanted -= len(take)
        return b"".join(out)

    def _refill(self) -> bool:
        if self._left > 0:
            if self._frames_left > 0 and self._transform is not None:
                frame = bytearray(self._take(self._transform.frame_size))
                self._transform(frame)
                self._frames_left -= 1
                self._pending = memoryview(frame)
            else:
                self._pending = memoryview(self._take(min(_COPY_BLOCK, self._left)))
            return True
        if self._pad:
            self._pad = 0
            self._pending = memoryview(b"\x00")
            return True
        return False

    def _take(self, count: int) -> bytes:
        data = self._stream.read(count)
        if len(data) != count:
            # validation checked the span lies inside the received bytes: they changed
            raise EOFError("the Pixel Data value ends early")
        self._left -= count
        return data


class EncodedInstance:
    """A PS3.10 file as pydicom wrote it, read front to back (``read``) by the encryptor.

    Small pieces are kept as written; the Pixel Data value, if streamed, is read from its
    source only while this is read.
    """

    def __init__(self, value: StreamedPixelData | None = None) -> None:
        self._pieces: list[bytes | _ValueRun] = []
        self._position = 0
        self._value = value
        self._value_reader: ReadableStream | None = None
        self._pending = memoryview(b"")
        self._index = 0

    # -- written by pydicom (sequential: it never seeks) -----------------------------------

    def write(self, data: bytes | _ValueRun) -> int:
        if isinstance(data, _ValueRun):
            last = self._pieces[-1] if self._pieces else None
            if isinstance(last, _ValueRun):  # pydicom reads in small pieces: one run
                self._pieces[-1] = _ValueRun(last.count + data.count)
            else:
                self._pieces.append(data)
        else:
            self._pieces.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def seek(self, *_: int) -> int:
        raise io.UnsupportedOperation("an encoded instance is written front to back")

    def flush(self) -> None:
        pass

    # -- read by the encryptor --------------------------------------------------------------

    @property
    def size(self) -> int:
        """The length of the whole file in bytes."""
        return self._position

    def read(self, size: int = -1, /) -> bytes:
        wanted = self._position if size < 0 else size
        out: list[bytes] = []
        while wanted > 0:
            if not self._pending and not self._next_piece():
                break
            take = self._pending[:wanted]
            out.append(bytes(take))
            self._pending = self._pending[len(take) :]
            wanted -= len(take)
        return b"".join(out)

    def _next_piece(self) -> bool:
        """Move to the next piece (or the next part of the value); False at the end."""
        if self._value_reader is not None:
            data = self._value_reader.read(_COPY_BLOCK)
            if data:
                self._pending = memoryview(data)
                return True
            self._value_reader = None
        if self._index >= len(self._pieces):
            return False
        piece = self._pieces[self._index]
        self._pieces[self._index] = b""  # read: let it go
        self._index += 1
        if isinstance(piece, _ValueRun):
            if self._value is None:  # pragma: no cover  # encode() sets it with the value
                raise RuntimeError("a streamed value without its source")
            self._value_reader = _Limited(self._value.open(), piece.count)
            return self._next_piece()
        self._pending = memoryview(piece)
        return True


class _Limited:
    """``count`` bytes of ``source``; fewer is a changed source."""

    def __init__(self, source: ReadableStream, count: int) -> None:
        self._source = source
        self._left = count

    def read(self, size: int, /) -> bytes:
        if self._left <= 0:
            return b""
        data = self._source.read(min(size, self._left))
        if not data:
            raise EOFError("the Pixel Data value ends early")
        self._left -= len(data)
        return data


def attach_pixel_data(dataset: Dataset, span: PixelDataSpan | None) -> None:
    """Give ``dataset`` (a de-identified header) the Pixel Data of ``span``, by reference:
    pixel rules then attach their blanking to it (``dicom.pixels``), and :func:`encode`
    streams it.
    """
    if span is not None:
        dataset[PIXEL_DATA] = DataElement(PIXEL_DATA, span.vr, StreamedPixelData(span))


def encode(dataset: Dataset) -> EncodedInstance:
    """``dataset`` as a PS3.10 file (``dcmwrite``, File Meta enforced), to be read once.

    A Pixel Data value that is a :class:`StreamedPixelData` is read from its span while the
    result is read; any other value is written by pydicom as usual.
    """
    element = dataset.get_item(PIXEL_DATA) if PIXEL_DATA in dataset else None
    value = getattr(element, "value", None)
    encoded = EncodedInstance(value if isinstance(value, StreamedPixelData) else None)
    dcmwrite(encoded, dataset, enforce_file_format=True)  # type: ignore[arg-type]  # write/tell suffice
    return encoded
