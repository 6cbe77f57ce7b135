"""The streamed de-identified file is byte for byte what pydicom writes with every value in
memory (the pipeline before it streamed), for every kind of Pixel Data ingest handles.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom import uid as dicom_uid
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite

from factories.dicom_factory import make_instance, to_bytes
from phivault.dicom import (
    DeidOptions,
    DicomRejected,
    PixelOutcomeKind,
    PixelRule,
    Region,
    RejectionCode,
    apply_pixel_rules,
    default_rules,
    deidentify,
    validate,
)
from phivault.dicom.part10 import attach_pixel_data, encode

SECRET = b"institution-one-secret-32-bytes!"
MAX = 10**9
RULES = default_rules(banner_rows=10)


def _in_memory(raw: bytes, rules: tuple[PixelRule, ...]) -> tuple[PixelOutcomeKind, bytes]:
    """The path before streaming: pydicom reads Pixel Data, pixel rules blank a copy."""
    dataset = validate(raw, max_size=MAX).dataset
    deidentified = deidentify(dataset, options=DeidOptions(), institution_secret=SECRET, pseudonym="pt_1")
    outcome = apply_pixel_rules(deidentified, rules)
    out = io.BytesIO()
    dcmwrite(out, deidentified, enforce_file_format=True)
    return outcome.kind, out.getvalue()


def _streamed(
    raw: bytes, rules: tuple[PixelRule, ...], *, read_size: int = 65536
) -> tuple[PixelOutcomeKind, bytes]:
    """The pipeline's path: the header de-identified, Pixel Data read while encoded."""
    validated = validate(io.BytesIO(raw), max_size=MAX)
    assert validated.pixel_data is not None
    assert "PixelData" not in validated.header
    deidentified = deidentify(
        validated.header, options=DeidOptions(), institution_secret=SECRET, pseudonym="pt_1"
    )
    attach_pixel_data(deidentified, validated.pixel_data)
    outcome = apply_pixel_rules(deidentified, rules)
    encoded = encode(deidentified)
    pieces = []
    while piece := encoded.read(read_size):
        pieces.append(piece)
    return outcome.kind, b"".join(pieces)


def _assert_same(raw: bytes, rules: tuple[PixelRule, ...], expected: PixelOutcomeKind) -> bytes:
    kind, before = _in_memory(raw, rules)
    assert kind is expected
    assert _streamed(raw, rules) == (kind, before)
    return before


@pytest.mark.parametrize("rules", [RULES, (PixelRule(regions=(Region(3, 2, 5, 70),)),)])
def test_native_single_frame_is_written_as_in_memory(rules: tuple[PixelRule, ...]) -> None:
    dataset, _ = make_instance()
    _assert_same(to_bytes(dataset), rules, PixelOutcomeKind.BLANKED)


def test_native_multi_frame_rgb_without_pixel_rules_is_written_as_in_memory() -> None:
    # 40 frames of 128 x 96 RGB: 1.4 MB, past the deferral size, so it stays in the stream.
    dataset, _ = make_instance(
        sop_class=dicom_uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
        modality="OT",
        frames=40,
        rows=96,
        columns=128,
        burned_in="NO",
    )
    _assert_same(to_bytes(dataset), RULES, PixelOutcomeKind.NOT_NEEDED)


@pytest.mark.parametrize(
    ("photometric", "planar", "rows", "columns"),
    [("RGB", 0, 96, 128), ("RGB", 1, 96, 128), ("MONOCHROME2", 0, 97, 131)],
)
def test_multi_frame_banner_blanking_is_written_as_in_memory(
    photometric: str, planar: int, rows: int, columns: int
) -> None:
    rgb = photometric == "RGB"
    dataset, _ = make_instance(
        sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, frames=30, rows=rows, columns=columns, rgb=rgb
    )
    if rgb:
        dataset.PlanarConfiguration = planar
    raw = _assert_same(to_bytes(dataset), RULES, PixelOutcomeKind.BLANKED)
    assert len(raw) > 256 * 1024


def test_odd_length_native_pixel_data_is_padded_as_in_memory() -> None:
    # 3 frames of 7 x 5 MONOCHROME2 8-bit: 105 bytes. pydicom pads what it writes, so the
    # received file is cut by hand: Pixel Data of odd length, as some devices send.
    dataset, _ = make_instance(
        sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, frames=3, rows=5, columns=7, rgb=False
    )
    padded = to_bytes(dataset)
    header = padded.rindex(b"\xe0\x7f\x10\x00OB\x00\x00")
    assert int.from_bytes(padded[header + 8 : header + 12], "little") == 106
    value = header + 12
    raw = (
        padded[: header + 8]
        + (105).to_bytes(4, "little")
        + padded[value : value + 105]
        + padded[value + 106 :]
    )
    written = _assert_same(raw, RULES, PixelOutcomeKind.BLANKED)
    assert len(written) % 2 == 0


@pytest.mark.parametrize("syntax", [dicom_uid.ImplicitVRLittleEndian, dicom_uid.ExplicitVRBigEndian])
def test_other_native_transfer_syntaxes_are_written_as_in_memory(syntax: dicom_uid.UID) -> None:
    dataset, _ = make_instance(
        sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, frames=30, rows=96, columns=128
    )
    dataset.file_meta.TransferSyntaxUID = syntax
    _assert_same(to_bytes(dataset), RULES, PixelOutcomeKind.BLANKED)


def test_elements_after_pixel_data_are_written_as_in_memory() -> None:
    dataset, _ = make_instance(
        sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, frames=30, rows=96, columns=128
    )
    dataset[0xFFFCFFFC] = DataElement(0xFFFCFFFC, "OB", b"\x00" * 64)  # Data Set Trailing Padding
    _assert_same(to_bytes(dataset), RULES, PixelOutcomeKind.BLANKED)


def _encapsulated(frames: int, frame_size: int, syntax: dicom_uid.UID) -> Dataset:
    dataset, _ = make_instance(
        sop_class=dicom_uid.SecondaryCaptureImageStorage, modality="OT", burned_in="NO", frames=frames
    )
    rng = np.random.default_rng(7)
    fragments = [rng.integers(0, 256, frame_size + n % 2, dtype=np.uint8).tobytes() for n in range(frames)]
    dataset.PixelData = encapsulate(fragments)
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = syntax
    return dataset


@pytest.mark.parametrize(("frames", "frame_size"), [(2, 1000), (6, 90_001)])
def test_encapsulated_pixel_data_is_streamed_as_received(frames: int, frame_size: int) -> None:
    dataset = _encapsulated(frames, frame_size, dicom_uid.JPEGBaseline8Bit)
    dataset[0xFFFCFFFC] = DataElement(0xFFFCFFFC, "OB", b"\x00" * 8)
    _assert_same(to_bytes(dataset), RULES, PixelOutcomeKind.NOT_NEEDED)


def test_rle_lossless_is_blanked_as_in_memory() -> None:
    dataset, _ = make_instance(
        sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, frames=30, rows=96, columns=128
    )
    dataset.compress(dicom_uid.RLELossless, generate_instance_uid=False)
    _assert_same(to_bytes(dataset), RULES, PixelOutcomeKind.BLANKED)


@pytest.mark.parametrize("read_size", [1, 4097, 1 << 20])
def test_the_encoded_file_reads_the_same_in_any_piece_size(read_size: int) -> None:
    dataset, _ = make_instance(
        sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, frames=30, rows=96, columns=128
    )
    raw = to_bytes(dataset)
    assert _streamed(raw, RULES, read_size=read_size) == _in_memory(raw, RULES)


def test_truncated_encapsulated_pixel_data_is_refused_as_truncated() -> None:
    raw = to_bytes(_encapsulated(6, 90_001, dicom_uid.JPEGBaseline8Bit))
    with pytest.raises(DicomRejected) as caught:
        validate(raw[: len(raw) - 50_000], max_size=MAX)
    assert caught.value.code is RejectionCode.TRUNCATED
