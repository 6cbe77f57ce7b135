"""Strict ingest validation: each refusal carries its code, C-STORE status and STOW-RS reason."""

from __future__ import annotations

import io

import pytest
from pydicom import uid as dicom_uid

from factories.dicom_factory import make_instance, to_bytes
from phivault.dicom import DicomRejected, RejectionCode, read_for_display, validate
from phivault.dicom.errors import DimseStatus, StowFailureReason

MAX = 10_000_000


def _valid_bytes(**kwargs: object) -> bytes:
    dataset, _ = make_instance(plant_phi=False, **kwargs)  # type: ignore[arg-type]
    return to_bytes(dataset)


def _rejection(raw: bytes, *, max_size: int = MAX) -> DicomRejected:
    with pytest.raises(DicomRejected) as caught:
        validate(raw, max_size=max_size)
    return caught.value


@pytest.mark.parametrize(
    ("sop_class", "modality", "frames", "photometric"),
    [
        (dicom_uid.UltrasoundImageStorage, "US", 1, "RGB"),
        (dicom_uid.UltrasoundMultiFrameImageStorage, "US", 4, "RGB"),
        (dicom_uid.SecondaryCaptureImageStorage, "OT", 1, "MONOCHROME2"),
        (dicom_uid.MultiFrameTrueColorSecondaryCaptureImageStorage, "OT", 3, "RGB"),
        (dicom_uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage, "OT", 3, "MONOCHROME2"),
        (dicom_uid.CTImageStorage, "CT", 1, "MONOCHROME2"),
        (dicom_uid.MRImageStorage, "MR", 1, "MONOCHROME2"),
        (dicom_uid.ComputedRadiographyImageStorage, "CR", 1, "MONOCHROME2"),
        (dicom_uid.DigitalXRayImageStorageForPresentation, "DX", 1, "MONOCHROME2"),
        (dicom_uid.DigitalXRayImageStorageForProcessing, "DX", 1, "MONOCHROME2"),
    ],
)
def test_supported_storage_sop_classes_are_accepted_with_their_uids(
    sop_class: str, modality: str, frames: int, photometric: str
) -> None:
    raw = _valid_bytes(sop_class=sop_class, modality=modality, frames=frames, rgb=photometric == "RGB")
    instance = validate(raw, max_size=MAX)
    assert instance.sop_class_uid == sop_class
    assert instance.study_instance_uid == "1.2.826.0.1.3680043.10.1444.1.1"
    assert instance.series_instance_uid == "1.2.826.0.1.3680043.10.1444.1.1.1"
    assert instance.sop_instance_uid == "1.2.826.0.1.3680043.10.1444.1.1.1.1"
    assert instance.transfer_syntax_uid == dicom_uid.ExplicitVRLittleEndian
    assert instance.size == len(raw)


def test_a_seekable_stream_is_validated_like_bytes() -> None:
    raw = _valid_bytes()
    instance = validate(io.BytesIO(raw), max_size=MAX)
    assert instance.size == len(raw)
    assert instance.dataset.PixelData == make_instance(plant_phi=False)[0].PixelData


def test_bytes_that_are_not_dicom_cannot_be_understood() -> None:
    rejected = _rejection(b"%PDF-1.7\n" + bytes(300))
    assert rejected.code is RejectionCode.NOT_DICOM
    assert rejected.dimse_status is DimseStatus.ERROR_CANNOT_UNDERSTAND
    assert rejected.stow_failure_reason is StowFailureReason.CANNOT_UNDERSTAND
    assert (int(rejected.dimse_status), int(rejected.stow_failure_reason)) == (0xC000, 0xC000)


def test_a_file_without_the_part10_preamble_is_refused_on_ingest_but_readable_for_display() -> None:
    dataset, _ = make_instance(plant_phi=False)
    full = to_bytes(dataset)
    assert full[128:132] == b"DICM"
    raw = full[132:]  # PS3.10 §7.1: 128-byte preamble and "DICM" removed
    assert _rejection(raw).code is RejectionCode.NOT_DICOM
    assert read_for_display(raw).SOPInstanceUID == dataset.SOPInstanceUID


@pytest.mark.parametrize("cut", [10, 1000, 5000])
def test_a_truncated_upload_is_refused(cut: int) -> None:
    raw = _valid_bytes()
    rejected = _rejection(raw[: len(raw) - cut])
    assert rejected.code in (RejectionCode.TRUNCATED, RejectionCode.NOT_DICOM)
    assert rejected.dimse_status == 0xC000
    assert rejected.stow_failure_reason == 0xC000


def test_a_truncated_large_pixel_data_element_is_refused_although_its_read_is_deferred() -> None:
    raw = _valid_bytes(rows=480, columns=640)  # 900 KiB of pixels: above the defer size
    assert _rejection(raw[:-1]).code is RejectionCode.TRUNCATED


@pytest.mark.parametrize(
    "keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"]
)
def test_a_missing_instance_study_series_or_class_uid_does_not_match_the_sop_class(keyword: str) -> None:
    dataset, _ = make_instance(plant_phi=False)
    del dataset[keyword]
    rejected = _rejection(to_bytes(dataset))
    assert rejected.code is RejectionCode.MISSING_UID
    assert rejected.dimse_status is DimseStatus.ERROR_DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert int(rejected.dimse_status) == 0xA900
    assert rejected.stow_failure_reason == 0xA900
    assert keyword in rejected.reason


def test_an_unsupported_sop_class_is_refused_with_0122() -> None:
    raw = _valid_bytes(sop_class=dicom_uid.RTPlanStorage, modality="RTPLAN")
    rejected = _rejection(raw)
    assert rejected.code is RejectionCode.UNSUPPORTED_SOP_CLASS
    assert rejected.dimse_status is DimseStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED
    assert int(rejected.dimse_status) == 0x0122
    assert rejected.stow_failure_reason == 0x0122


def test_an_instance_over_the_size_limit_is_refused_as_out_of_resources_before_parsing() -> None:
    raw = _valid_bytes()
    rejected = _rejection(raw, max_size=len(raw) - 1)
    assert rejected.code is RejectionCode.TOO_LARGE
    assert rejected.dimse_status is DimseStatus.REFUSED_OUT_OF_RESOURCES
    assert int(rejected.dimse_status) == 0xA700
    assert rejected.stow_failure_reason == 0xA700
    assert validate(raw, max_size=len(raw)).size == len(raw)


def test_an_oversize_non_seekable_stream_is_refused_without_reading_it_all() -> None:
    class OneWay(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.inner = io.BytesIO(data)
            self.read_total = 0

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            n = self.inner.readinto(buffer)
            self.read_total += n
            return n

    stream = OneWay(_valid_bytes(rows=480, columns=640))
    with pytest.raises(DicomRejected) as caught:
        validate(io.BufferedReader(stream), max_size=100_000)
    assert caught.value.code is RejectionCode.TOO_LARGE
    assert stream.read_total < 200_000


def test_a_value_that_breaks_its_vr_is_refused_by_the_strict_reader() -> None:
    dataset, _ = make_instance(plant_phi=False)
    dataset.InstanceNumber = 4242
    raw = to_bytes(dataset)
    # Patch the bytes, not the data set: pydicom would refuse to write the bad value.
    assert raw.count(b"4242") == 1
    rejected = _rejection(raw.replace(b"4242", b"42A2"))
    assert rejected.__cause__ is None  # pydicom's message, which quotes the value, is dropped
    assert rejected.code is RejectionCode.INVALID_VALUE
    assert rejected.dimse_status == 0xC000


def test_an_unsupported_transfer_syntax_is_refused_with_c122_for_stow() -> None:
    dataset, _ = make_instance(plant_phi=False)
    raw = to_bytes(dataset)
    explicit = dicom_uid.ExplicitVRLittleEndian.encode() + b"\x00"
    assert explicit in raw
    # A private transfer syntax UID of the same length: parsed as explicit VR but not accepted.
    raw = raw.replace(explicit, b"1.2.826.0.1.3680043\x00", 1)
    rejected = _rejection(raw)
    assert rejected.code is RejectionCode.UNSUPPORTED_TRANSFER_SYNTAX
    assert rejected.stow_failure_reason is StowFailureReason.REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED
    assert int(rejected.stow_failure_reason) == 0xC122


def test_rejection_reasons_never_quote_values_of_the_instance() -> None:
    dataset, _ = make_instance(plant_phi=False)
    uid = dataset.SOPInstanceUID.encode()
    raw = to_bytes(dataset).replace(uid, b"1.2.3.Quixworth".ljust(len(uid), b"9"))
    rejected = _rejection(raw)
    assert rejected.code is RejectionCode.INVALID_VALUE
    assert "Quixworth" not in str(rejected)
    assert "Quixworth" not in rejected.reason


def test_the_display_reader_shows_what_the_strict_reader_refuses() -> None:
    dataset, _ = make_instance(plant_phi=False)
    dataset.InstanceNumber = 4242
    bad = to_bytes(dataset).replace(b"4242", b"42A2")
    assert _rejection(bad).code is RejectionCode.INVALID_VALUE
    shown = read_for_display(bad)
    assert shown.SOPInstanceUID == dataset.SOPInstanceUID
    assert shown["InstanceNumber"].value == "42A2"


def _deflated(dataset_kwargs: dict[str, object] | None = None) -> tuple[bytes, bytes]:
    """A deflated instance (PS3.5 A.5) and its pixels."""
    dataset, _ = make_instance(plant_phi=False, **(dataset_kwargs or {}))  # type: ignore[arg-type]
    dataset.file_meta.TransferSyntaxUID = dicom_uid.DeflatedExplicitVRLittleEndian
    return to_bytes(dataset), bytes(dataset.PixelData)


def _deflate_bomb(inflated_size: int) -> bytes:
    """A valid File Meta group, then a deflated data set of ``inflated_size`` bytes: one
    OB element of zeros, which compresses about a thousandfold.
    """
    import struct  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    head, _ = _deflated()
    meta_end = 144 + struct.unpack("<I", head[140:144])[0]  # (0002,0000) gives the group's length
    value = inflated_size - 12
    element = struct.pack("<HH2sHI", 0x0009, 0x0010, b"OB", 0, value)  # a private OB, zeros
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(element)
    zeros = bytes(1 << 20)
    for _ in range(value // len(zeros)):
        body += deflate.compress(zeros)
    body += deflate.compress(bytes(value % len(zeros))) + deflate.flush()
    return head[:meta_end] + body


def test_a_deflated_instance_with_large_pixel_data_is_accepted_with_its_pixels() -> None:
    raw, pixels = _deflated({"rows": 480, "columns": 640})  # 900 KiB of pixels: above the defer size
    assert len(raw) < len(pixels)  # really deflated
    instance = validate(raw, max_size=MAX)
    assert instance.transfer_syntax_uid == dicom_uid.DeflatedExplicitVRLittleEndian
    assert instance.size == len(raw)  # the received bytes, not the inflated data set
    assert instance.pixel_data is None  # inflated in memory: nothing to stream from the bytes
    assert bytes(instance.header.PixelData) == pixels


def test_a_deflated_instance_is_read_from_a_stream_too() -> None:
    raw, pixels = _deflated({"rows": 480, "columns": 640})
    assert bytes(validate(io.BytesIO(raw), max_size=MAX).header.PixelData) == pixels


def test_a_deflate_bomb_is_refused_as_too_large_without_inflating_it() -> None:
    raw = _deflate_bomb(512 * 1024 * 1024)  # 512 MiB once inflated
    assert len(raw) < 1024 * 1024
    rejected = _rejection(raw, max_size=MAX)
    assert rejected.code is RejectionCode.TOO_LARGE
    assert "inflated" in rejected.reason


def test_a_cut_deflated_data_set_is_refused_as_truncated() -> None:
    raw, _ = _deflated({"rows": 480, "columns": 640})
    assert _rejection(raw[: len(raw) // 2]).code is RejectionCode.TRUNCATED


def test_a_deflated_data_set_that_is_no_deflate_stream_cannot_be_understood() -> None:
    raw, _ = _deflated()
    import struct  # noqa: PLC0415

    meta_end = 144 + struct.unpack("<I", raw[140:144])[0]
    assert _rejection(raw[:meta_end] + b"\xff" * 4096).code is RejectionCode.NOT_DICOM
