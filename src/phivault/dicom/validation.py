"""Parse and validate one received instance: strict on ingest, lenient for display.

pydicom's value validation mode is process-wide (``config.settings``), so both readers take
one lock while they parse; the strict reader converts every element inside it, so a value
that breaks its VR (PS3.5 §6.2) raises there and not later in another thread's mode.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Final

import pydicom
from pydicom import config
from pydicom import uid as dicom_uid
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.fileutil import read_undefined_length_value
from pydicom.tag import SequenceDelimiterTag

from phivault.dicom.errors import DicomRejected, RejectionCode
from phivault.dicom.part10 import PIXEL_DATA, PixelDataSpan

# Storage SOP Classes accepted (PS3.4 Annex B.5 Table B.5-1).
SUPPORTED_SOP_CLASSES: Final[frozenset[str]] = frozenset(
    {
        dicom_uid.UltrasoundImageStorage,
        dicom_uid.UltrasoundMultiFrameImageStorage,
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (Retired); older devices still send it
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
        dicom_uid.SecondaryCaptureImageStorage,
        dicom_uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
        dicom_uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        dicom_uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        dicom_uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
        dicom_uid.CTImageStorage,
        dicom_uid.EnhancedCTImageStorage,
        dicom_uid.MRImageStorage,
        dicom_uid.EnhancedMRImageStorage,
        dicom_uid.ComputedRadiographyImageStorage,
        dicom_uid.DigitalXRayImageStorageForPresentation,
        dicom_uid.DigitalXRayImageStorageForProcessing,
    }
)

ULTRASOUND_SOP_CLASSES: Final[frozenset[str]] = frozenset(
    {
        dicom_uid.UltrasoundImageStorage,
        dicom_uid.UltrasoundMultiFrameImageStorage,
        "1.2.840.10008.5.1.4.1.1.6",
        "1.2.840.10008.5.1.4.1.1.3",
    }
)

# Transfer syntaxes kept as received: never re-encoded (PS3.5 Annex A).
SUPPORTED_TRANSFER_SYNTAXES: Final[frozenset[str]] = frozenset(
    {
        dicom_uid.ImplicitVRLittleEndian,
        dicom_uid.ExplicitVRLittleEndian,
        dicom_uid.DeflatedExplicitVRLittleEndian,
        dicom_uid.ExplicitVRBigEndian,
        dicom_uid.JPEGBaseline8Bit,
        dicom_uid.JPEGExtended12Bit,
        dicom_uid.JPEGLossless,
        dicom_uid.JPEGLosslessSV1,
        dicom_uid.JPEGLSLossless,
        dicom_uid.JPEGLSNearLossless,
        dicom_uid.JPEG2000Lossless,
        dicom_uid.JPEG2000,
        dicom_uid.HTJ2KLossless,
        dicom_uid.HTJ2KLosslessRPCL,
        dicom_uid.HTJ2K,
        dicom_uid.RLELossless,
        # Ultrasound cine loops are often sent as video.
        dicom_uid.MPEG2MPML,
        dicom_uid.MPEG2MPHL,
        dicom_uid.MPEG4HP41,
        dicom_uid.MPEG4HP41BD,
        dicom_uid.HEVCMP51,
        dicom_uid.HEVCM10P51,
    }
)

# Elements larger than this stay in the received buffer until first used (pixel data).
DEFER_SIZE: Final = 256 * 1024
_INFLATE_CHUNK: Final = 1024 * 1024
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF
_CONFIG_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class ValidatedInstance:
    """A parsed instance that passed every ingest check.

    The pixel data of ``dataset`` may still be in the received buffer (deferred read): keep a
    stream passed to :func:`validate` open until the dataset has been written out.
    ``header`` is ``dataset`` without its top-level Pixel Data when ``pixel_data`` says where
    that value lies in the stream (ingest streams it from there, never holding it), else
    ``dataset`` itself.
    """

    dataset: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    size: int
    header: Dataset
    pixel_data: PixelDataSpan | None = None


# What pydicom raises on hostile input besides its own errors, found by fuzzing
# (tests/fuzz): e.g. LookupError for an unknown Specific Character Set, RecursionError for
# deeply nested sequences. Every one means "this cannot be parsed", never a crash.
_PARSE_ERRORS = (
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    OverflowError,
    NotImplementedError,
    RecursionError,
    BytesLengthException,  # a value whose length is not a multiple of its VR's width
)


def validate(raw: bytes | BinaryIO, *, max_size: int) -> ValidatedInstance:
    """Parse ``raw`` strictly as a DICOM PS3.10 file and check it may be ingested.

    Raises :class:`DicomRejected` with the code, C-STORE status and STOW-RS failure reason.
    """
    stream, size = _open(raw, max_size=max_size)
    with _CONFIG_LOCK, config.strict_reading():
        try:
            dataset, extent = _read(stream, size, max_size=max_size)
        except InvalidDicomError:
            raise DicomRejected(
                RejectionCode.NOT_DICOM, "no DICOM preamble and 'DICM' prefix (PS3.10 §7.1)"
            ) from None
        # "from None": pydicom's messages quote element values, which may be PHI.
        except (EOFError, OSError, struct.error):
            raise DicomRejected(RejectionCode.TRUNCATED, "the data ends inside an element") from None
        except _PARSE_ERRORS:
            raise DicomRejected(RejectionCode.NOT_DICOM, "the data set cannot be parsed") from None
        _check_complete(dataset, extent)
        try:
            streamable = _convert_all(dataset)
            _check_file_meta_vrs(dataset)
            pixel_data = _pixel_data_span(dataset, stream) if streamable else None
        except (EOFError, OSError, struct.error):
            raise DicomRejected(RejectionCode.TRUNCATED, "the data ends inside an element") from None
        except _PARSE_ERRORS:
            raise DicomRejected(
                RejectionCode.INVALID_VALUE, "a value does not conform to its VR (PS3.5 §6.2)"
            ) from None
    transfer_syntax = str(dataset.file_meta.get("TransferSyntaxUID", ""))
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise DicomRejected(RejectionCode.UNSUPPORTED_TRANSFER_SYNTAX, "transfer syntax not supported")
    sop_class = _required_uid(dataset, "SOPClassUID")
    if sop_class not in SUPPORTED_SOP_CLASSES:
        raise DicomRejected(RejectionCode.UNSUPPORTED_SOP_CLASS, "SOP Class not supported")
    return ValidatedInstance(
        dataset=dataset,
        sop_class_uid=sop_class,
        sop_instance_uid=_required_uid(dataset, "SOPInstanceUID"),
        study_instance_uid=_required_uid(dataset, "StudyInstanceUID"),
        series_instance_uid=_required_uid(dataset, "SeriesInstanceUID"),
        transfer_syntax_uid=transfer_syntax,
        size=size,
        header=dataset if pixel_data is None else _without_pixel_data(dataset),
        pixel_data=pixel_data,
    )


def _read(stream: BinaryIO, size: int, *, max_size: int) -> tuple[Dataset, int]:
    """The data set, and the size its element offsets refer to: the received bytes, or the
    inflated data set of Deflated Explicit VR Little Endian (PS3.5 A.5).

    pydicom inflates a deflated data set without bound (a few MB can inflate to many GB):
    here it is inflated to at most ``max_size`` bytes, and refused past that.
    """
    start = stream.tell()
    preamble, meta = read_file_meta(stream)
    if not is_deflated(meta):
        stream.seek(start)
        return pydicom.dcmread(stream, force=False, defer_size=DEFER_SIZE), size
    inflated = _inflate(stream, max_size)
    body = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    dataset = FileDataset("", body, preamble=preamble, file_meta=FileMetaDataset(meta))
    dataset.set_original_encoding(False, True, body.original_character_set)
    return dataset, len(inflated)


def read_file_meta(stream: BinaryIO) -> tuple[bytes | None, Dataset]:
    """The preamble and File Meta group (PS3.10 §7.1) of a PS3.10 file, read up to the data
    set; ``InvalidDicomError`` without the "DICM" prefix. Nothing of the data set is read.
    """
    preamble = read_preamble(stream, force=False)
    meta = read_dataset(stream, is_implicit_VR=False, is_little_endian=True, stop_when=_past_file_meta)
    return preamble, meta


def is_deflated(meta: Dataset) -> bool:
    """Whether the data set after this File Meta group is deflated (PS3.5 A.5)."""
    return str(meta.get("TransferSyntaxUID", "")) == dicom_uid.DeflatedExplicitVRLittleEndian


def _past_file_meta(tag: int, _vr: str | None, _length: int) -> bool:
    return (tag >> 16) != 0x0002  # noqa: PLR2004  # the File Meta group


def _inflate(stream: BinaryIO, max_size: int) -> bytes:
    """The raw DEFLATE stream (RFC 1951) that follows the File Meta group, inflated."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        while chunk := stream.read(_INFLATE_CHUNK):
            out += inflater.decompress(chunk, max_size + 1 - len(out))
            if len(out) > max_size or inflater.unconsumed_tail:
                raise DicomRejected(
                    RejectionCode.TOO_LARGE, f"the inflated data set is larger than {max_size} bytes"
                )
            if inflater.eof:
                break
        out += inflater.flush()
    except zlib.error:
        raise DicomRejected(RejectionCode.NOT_DICOM, "the deflated data set cannot be inflated") from None
    if not inflater.eof:
        raise DicomRejected(RejectionCode.TRUNCATED, "the deflated data set ends early")
    if len(out) > max_size:
        raise DicomRejected(RejectionCode.TOO_LARGE, f"the inflated data set is larger than {max_size} bytes")
    return bytes(out)


def _pixel_data_span(dataset: Dataset, stream: BinaryIO) -> PixelDataSpan | None:
    """Where the value of the top-level Pixel Data lies in ``stream``, and its VR."""
    if PIXEL_DATA not in dataset:
        return None
    raw = dataset.get_item(PIXEL_DATA, keep_deferred=True)
    if not isinstance(raw, RawDataElement):
        return None  # pragma: no cover  # validate() never converts it
    if raw.length != _UNDEFINED_LENGTH:
        length = raw.length
    elif raw.value is not None:
        length = len(raw.value)
    else:
        # Encapsulated and deferred: find the Sequence Delimitation Item (PS3.5 A.4) as
        # pydicom does, reading item headers only.
        stream.seek(raw.value_tell)
        read_undefined_length_value(stream, raw.is_little_endian, SequenceDelimiterTag, defer_size=0)
        length = stream.tell() - 8 - raw.value_tell
    # The VR pydicom gives the element once converted (ambiguous "OB or OW" and UN resolved
    # from the data set, PS3.5 A.1/A.2/A.4): converted from an empty stand-in, not the value.
    dataset[PIXEL_DATA] = raw._replace(value=b"")
    vr = str(dataset[PIXEL_DATA].VR)
    dataset[PIXEL_DATA] = raw
    return PixelDataSpan(stream, raw.value_tell, length, vr)


def _without_pixel_data(dataset: Dataset) -> Dataset:
    """A data set with the same elements (shared, not copied) but the top-level Pixel Data."""
    header = Dataset({tag: dataset.get_item(tag) for tag in dataset.keys() if tag != PIXEL_DATA})  # noqa: SIM118
    header.file_meta = dataset.file_meta
    implicit, little = dataset.original_encoding
    if implicit is not None and little is not None:
        header.set_original_encoding(implicit, little, dataset.original_character_set)
    return header


def _convert_all(dataset: Dataset) -> bool:
    """Convert every element, which validates its value against its VR; the File Meta group
    (0002) too, which iterall() leaves out (found by fuzzing). The top-level Pixel Data is
    left where it is (an OB/OW value has nothing to check) unless the data set was inflated
    in memory (Deflated Explicit VR Little Endian, PS3.5 A.5): then its offsets do not point
    into the received bytes. Returns whether Pixel Data was left in the stream.
    """
    for _ in dataset.file_meta.iterall():
        pass
    transfer_syntax = str(dataset.file_meta.get("TransferSyntaxUID", ""))
    streamable = transfer_syntax != dicom_uid.DeflatedExplicitVRLittleEndian
    for tag in dataset.keys():  # noqa: SIM118 — Dataset iterates elements, not tags
        if streamable and tag == PIXEL_DATA:
            continue
        element = dataset[tag]
        if element.VR == "SQ":
            for item in element.value:
                for _ in item.iterall():
                    pass
    return streamable


def _check_file_meta_vrs(dataset: Dataset) -> None:
    """PS3.10 §7.1 (Table 7.1-1) fixes the VR of every File Meta element; a file that says
    otherwise is malformed (found by fuzzing: a UID element read as TM broke later steps).
    """
    for element in dataset.file_meta:
        try:
            expected = dictionary_VR(element.tag)
        except KeyError:
            continue  # an element this dictionary does not know: nothing to compare with
        if element.VR not in expected.split(" or "):
            raise DicomRejected(
                RejectionCode.INVALID_VALUE, "a File Meta element has the wrong VR (PS3.10 §7.1)"
            )


def read_for_display(raw: bytes | BinaryIO) -> Dataset:
    """Parse leniently, for showing what was received: no preamble needed, no value checks.

    Never use the result for ingest; :func:`validate` decides what may be stored.
    """
    stream = io.BytesIO(raw) if isinstance(raw, bytes | bytearray | memoryview) else raw
    with _CONFIG_LOCK, config.disable_value_validation():
        dataset = pydicom.dcmread(stream, force=True, defer_size=DEFER_SIZE)
        for _ in dataset.iterall():
            pass  # convert now, under the lenient mode, not later under another one
    return dataset


def _open(raw: bytes | BinaryIO, *, max_size: int) -> tuple[BinaryIO, int]:
    if isinstance(raw, bytes | bytearray | memoryview):
        size = len(raw)
        stream: BinaryIO = io.BytesIO(raw)
    elif raw.seekable():
        start = raw.tell()
        size = raw.seek(0, io.SEEK_END) - start
        raw.seek(start)
        stream = raw
    else:
        data = raw.read(max_size + 1)
        size, stream = len(data), io.BytesIO(data)
    if size > max_size:
        raise DicomRejected(RejectionCode.TOO_LARGE, f"instance larger than {max_size} bytes")
    return stream, size


def _check_complete(dataset: Dataset, size: int) -> None:
    """Refuse a file whose last top-level element runs past its end.

    pydicom returns the bytes that are there for a short final value and defers large
    values without reading them, so a truncated upload would otherwise parse.
    """
    for tag in list(dataset.keys()):
        element = dataset.get_item(tag, keep_deferred=True)
        if not isinstance(element, RawDataElement) or element.length == _UNDEFINED_LENGTH:
            continue
        if element.value is None:
            complete = element.value_tell + element.length <= size
        else:
            complete = len(element.value) == element.length
        if not complete:
            raise DicomRejected(RejectionCode.TRUNCATED, "the data ends inside an element")


def _required_uid(dataset: Dataset, keyword: str) -> str:
    # Type 1 in the SOP Common, General Study and General Series modules (PS3.3 C.12.1,
    # C.7.2.1, C.7.3.1); a UID is at most 64 characters of digits and dots (PS3.5 §9.1).
    value = dataset.get(keyword)
    text = str(value) if value is not None else ""
    if not text or not dicom_uid.UID(text).is_valid:
        raise DicomRejected(RejectionCode.MISSING_UID, f"{keyword} is missing or not a valid UID")
    return text
