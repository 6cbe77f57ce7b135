"""Where things are inside a stored PS3.10 file, read through random access.

WADO-RS reads an encrypted object through ``OpenedObject.read(offset, length)``: each call
decrypts only the segments it touches. This module finds, from the header alone, where the
Pixel Data element (7FE0,0010) starts and where each frame lies inside it, so that one frame
costs one small range read instead of decrypting the whole object:

* native (uncompressed) pixel data: frame *n* starts at ``value + (n - 1) * frame size``
  (PS3.5 §8.1.1; frames are contiguous, single-bit frames are packed across byte
  boundaries);
* encapsulated pixel data (PS3.5 §A.4): the Basic Offset Table, the Extended Offset Table
  (7FE0,0001) or the fragment items locate the frame; ``pydicom.encaps.get_frame`` walks
  them through a seekable view and reads only those bytes;
* video transfer syntaxes hold one stream for all frames: no single frame can be cut out.
"""

from __future__ import annotations

import io
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
from pydicom import dcmread
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame

PIXEL_DATA_TAG: Final = 0x7FE00010
_BLOCK: Final = 256 * 1024  # the object format's default segment size (crypto.stream)
_CACHED_BLOCKS: Final = 8
_UNDEFINED: Final = 0xFFFFFFFF
_LONG_VRS: Final = frozenset({b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_VIDEO: Final = frozenset(
    {
        dicom_uid.MPEG2MPML,
        dicom_uid.MPEG2MPHL,
        dicom_uid.MPEG4HP41,
        dicom_uid.MPEG4HP41BD,
        dicom_uid.MPEG4HP422D,
        dicom_uid.MPEG4HP423D,
        dicom_uid.MPEG4HP42STEREO,
        dicom_uid.HEVCMP51,
        dicom_uid.HEVCM10P51,
    }
)


class RangeReadable(Protocol):
    """Random access to plaintext (``crypto.service.OpenedObject`` is one)."""

    @property
    def plaintext_size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


class LayoutError(ValueError):
    """The stored file is not laid out as its header says (should not happen: ingest wrote it)."""


class FramesUnavailable(ValueError):
    """Single frames cannot be cut out of this instance (no pixel data, or a video stream)."""


class RangeFile(io.RawIOBase):
    """A seekable read-only file over a ``RangeReadable``, with a small cache of aligned blocks
    (parsing reads a few bytes at a time; each block is decrypted once).
    """

    name = "stored-instance"  # pydicom records the "file name" of what it reads

    def __init__(self, source: RangeReadable) -> None:
        super().__init__()
        self._source = source
        self._size = source.plaintext_size
        self._position = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def _block(self, index: int) -> bytes:
        with self._lock:
            cached = self._blocks.get(index)
            if cached is not None:
                self._blocks.move_to_end(index)
                return cached
        start = index * _BLOCK
        data = self._source.read(start, min(_BLOCK, self._size - start))
        with self._lock:
            self._blocks[index] = data
            while len(self._blocks) > _CACHED_BLOCKS:
                self._blocks.popitem(last=False)
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        if self._position >= self._size or not len(view):
            return 0
        count = min(len(view), self._size - self._position)
        done = 0
        while done < count:
            index, offset = divmod(self._position + done, _BLOCK)
            block = self._block(index)
            piece = block[offset : offset + count - done]
            view[done : done + len(piece)] = piece
            done += len(piece)
        self._position += count
        return count


@dataclass(frozen=True, slots=True)
class PixelDataElement:
    """Where the Pixel Data element lies in the stored file."""

    element_offset: int  # its tag
    value_offset: int  # its first value byte
    value_length: int | None  # None: undefined length (encapsulated)


@dataclass(frozen=True, slots=True)
class FrameGeometry:
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    number_of_frames: int
    photometric: str

    @property
    def frame_bits(self) -> int:
        pixels = self.rows * self.columns
        if self.photometric == "YBR_FULL_422":  # two samples per pixel when stored native (PS3.3 C.7.6.3.1.2)
            return pixels * 2 * self.bits_allocated
        return pixels * self.samples_per_pixel * self.bits_allocated


@dataclass(frozen=True, slots=True)
class InstanceLayout:
    """The header (everything before Pixel Data, with its File Meta) and where Pixel Data is.

    ``pixel_data`` is None when the file has none, or when its position cannot be used for
    range reads (a deflated transfer syntax compresses the whole data set).
    """

    header: Dataset
    transfer_syntax_uid: str
    pixel_data: PixelDataElement | None

    @property
    def is_encapsulated(self) -> bool:
        return dicom_uid.UID(self.transfer_syntax_uid).is_encapsulated

    @property
    def is_video(self) -> bool:
        return self.transfer_syntax_uid in _VIDEO

    def geometry(self) -> FrameGeometry:
        header = self.header
        try:
            return FrameGeometry(
                rows=int(header.Rows),
                columns=int(header.Columns),
                samples_per_pixel=int(header.get("SamplesPerPixel", 1) or 1),
                bits_allocated=int(header.BitsAllocated),
                number_of_frames=int(header.get("NumberOfFrames", 1) or 1),
                photometric=str(header.get("PhotometricInterpretation", "")),
            )
        except (AttributeError, TypeError, ValueError):
            raise FramesUnavailable("the instance has no image pixel description") from None


def read_layout(source: RangeReadable) -> InstanceLayout:
    """Parse the header of a stored file through range reads; locate Pixel Data."""
    raw = RangeFile(source)
    stream = io.BufferedReader(raw, buffer_size=64 * 1024)
    header = dcmread(stream, stop_before_pixels=True)
    transfer_syntax = str(header.file_meta.TransferSyntaxUID)
    if transfer_syntax == dicom_uid.DeflatedExplicitVRLittleEndian:
        return InstanceLayout(header, transfer_syntax, None)
    offset = stream.tell()
    if offset >= source.plaintext_size:
        return InstanceLayout(header, transfer_syntax, None)
    return InstanceLayout(header, transfer_syntax, _pixel_element(source, offset, transfer_syntax))


def _pixel_element(source: RangeReadable, offset: int, transfer_syntax: str) -> PixelDataElement | None:
    syntax = dicom_uid.UID(transfer_syntax)
    endian = "<" if syntax.is_little_endian else ">"
    head = source.read(offset, min(12, source.plaintext_size - offset))
    if len(head) < 8:  # noqa: PLR2004  # a tag and a length at least
        return None
    group, element = struct.unpack(endian + "HH", head[:4])
    if (group << 16) | element != PIXEL_DATA_TAG:
        return None  # stopped before another pixel element (float pixel data): not ranged
    if syntax.is_implicit_VR:
        (length,) = struct.unpack(endian + "L", head[4:8])
        value_offset = offset + 8
    elif head[4:6] in _LONG_VRS:
        (length,) = struct.unpack(endian + "L", head[8:12])
        value_offset = offset + 12
    else:
        (length,) = struct.unpack(endian + "H", head[6:8])
        value_offset = offset + 8
    if length == _UNDEFINED:
        return PixelDataElement(offset, value_offset, None)
    if value_offset + length > source.plaintext_size:
        raise LayoutError("the pixel data runs past the end of the file")
    return PixelDataElement(offset, value_offset, length)


def read_frames(source: RangeReadable, layout: InstanceLayout, numbers: Sequence[int]) -> list[bytes]:
    """Frames ``numbers`` (1-based, PS3.18 §10.4.1.1.4) as stored: native frames little
    endian, encapsulated frames as their fragments' bytes. Only their bytes are decrypted.
    """
    pixel = layout.pixel_data
    if pixel is None or layout.is_video:
        raise FramesUnavailable("frames cannot be cut out of this instance")
    geometry = layout.geometry()
    for number in numbers:
        if not 1 <= number <= geometry.number_of_frames:
            raise IndexError(number)
    if pixel.value_length is not None:
        return [_native_frame(source, layout, pixel, geometry, number) for number in numbers]
    stream = io.BufferedReader(RangeFile(source), buffer_size=64 * 1024)
    extended = _extended_offsets(layout.header)
    frames = []
    for number in numbers:
        stream.seek(pixel.value_offset)
        try:
            frames.append(
                get_frame(
                    stream,
                    number - 1,
                    number_of_frames=geometry.number_of_frames,
                    extended_offsets=extended,
                    endianness="<" if dicom_uid.UID(layout.transfer_syntax_uid).is_little_endian else ">",
                )
            )
        except (ValueError, KeyError) as exc:
            raise LayoutError("the encapsulated pixel data does not hold this frame") from exc
    return frames


def _extended_offsets(header: Dataset) -> tuple[bytes, bytes] | None:
    offsets = header.get("ExtendedOffsetTable")
    lengths = header.get("ExtendedOffsetTableLengths")
    if offsets is None or lengths is None:
        return None
    return bytes(offsets.value), bytes(lengths.value)


def _native_frame(
    source: RangeReadable,
    layout: InstanceLayout,
    pixel: PixelDataElement,
    geometry: FrameGeometry,
    number: int,
) -> bytes:
    assert pixel.value_length is not None  # noqa: S101  # nosec B101  # native: defined length
    bits = geometry.frame_bits
    start_bit = (number - 1) * bits
    if start_bit % 8 == 0 and bits % 8 == 0:
        start, length = pixel.value_offset + start_bit // 8, bits // 8
        if start + length > pixel.value_offset + pixel.value_length:
            raise LayoutError("the pixel data is shorter than its frames")
        data = source.read(start, length)
        if not dicom_uid.UID(layout.transfer_syntax_uid).is_little_endian and geometry.bits_allocated > 8:  # noqa: PLR2004
            # application/octet-stream frames are little endian (PS3.18 §8.7.3.5.1)
            width = geometry.bits_allocated // 8
            data = np.frombuffer(data, dtype=f">u{width}").astype(f"<u{width}").tobytes()
        return data
    # Single-bit frames packed across bytes (PS3.5 §8.1.1): cut the bits out, repack them.
    first_byte, last_byte = start_bit // 8, (start_bit + bits - 1) // 8
    chunk = source.read(pixel.value_offset + first_byte, last_byte - first_byte + 1)
    unpacked = np.unpackbits(np.frombuffer(chunk, dtype=np.uint8), bitorder="little")
    offset = start_bit - first_byte * 8
    return np.packbits(unpacked[offset : offset + bits], bitorder="little").tobytes()
