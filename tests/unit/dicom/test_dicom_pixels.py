"""Burned-in text: regions blanked in every frame and sample, or the instance is quarantined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid as dicom_uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from factories.dicom_factory import make_instance, pixel_pattern, to_bytes
from phivault.dicom import (
    DeidOptions,
    PixelOutcomeKind,
    PixelRule,
    QuarantineReason,
    Region,
    apply_pixel_rules,
    default_rules,
    deidentify,
    validate,
)

SECRET = b"institution-one-secret-32-bytes!"


def _deidentified(**kwargs: object) -> Dataset:
    dataset, _ = make_instance(**kwargs)  # type: ignore[arg-type]
    ingested = validate(to_bytes(dataset), max_size=10**8).dataset
    return deidentify(ingested, options=DeidOptions(), institution_secret=SECRET, pseudonym="pt_1")


def _mask(shape: tuple[int, ...], region: Region) -> np.ndarray:
    mask = np.zeros(shape[:3], dtype=bool)
    mask[:, region.y : region.y + region.height, region.x : region.x + region.width] = True
    return mask


def _pixels(dataset: Dataset) -> np.ndarray:
    # Through pydicom's own pixel handling, as a viewer would decode the written file.
    array = pydicom.dcmread(pydicom.filebase.DicomBytesIO(to_bytes(dataset))).pixel_array
    return array if int(dataset.get("NumberOfFrames", 1) or 1) > 1 else array[np.newaxis]


@pytest.mark.parametrize(
    ("frames", "photometric"), [(1, "RGB"), (1, "MONOCHROME2"), (6, "RGB"), (6, "MONOCHROME2")]
)
def test_default_ultrasound_rule_zeroes_the_top_banner_and_leaves_the_rest(
    frames: int, photometric: str
) -> None:
    rgb = photometric == "RGB"
    sop_class = dicom_uid.UltrasoundMultiFrameImageStorage if frames > 1 else dicom_uid.UltrasoundImageStorage
    dataset = _deidentified(frames=frames, rgb=rgb, sop_class=sop_class)
    outcome = apply_pixel_rules(dataset, default_rules(banner_rows=10))
    assert outcome.kind is PixelOutcomeKind.BLANKED
    original = pixel_pattern(48, 64, frames, rgb=rgb)
    after = _pixels(dataset)
    mask = _mask(original.shape, Region(0, 0, 64, 10))
    assert (after[mask] == 0).all()
    assert (after[~mask] == original[~mask]).all()
    assert dataset.BurnedInAnnotation == "NO"
    assert dataset.file_meta.TransferSyntaxUID == dicom_uid.ExplicitVRLittleEndian
    assert [item.CodeValue for item in dataset.DeidentificationMethodCodeSequence][-1] == "113101"


def test_a_device_rule_blanks_only_its_regions_in_every_frame() -> None:
    dataset = _deidentified(frames=4, rgb=True, sop_class=dicom_uid.UltrasoundMultiFrameImageStorage)
    regions = (Region(5, 3, 20, 7), Region(50, 40, 100, 100))  # the second runs off the image
    rule = PixelRule(regions=regions, manufacturer="ACME SONICS", model_pattern="sono *", rows=48, columns=64)
    outcome = apply_pixel_rules(dataset, (rule,))
    assert outcome.kind is PixelOutcomeKind.BLANKED
    assert outcome.rule is rule
    original = pixel_pattern(48, 64, 4, rgb=True)
    mask = _mask(original.shape, regions[0]) | _mask(original.shape, regions[1])
    after = _pixels(dataset)
    assert (after[mask] == 0).all()
    assert (after[~mask] == original[~mask]).all()


def test_planar_rgb_and_16_bit_grayscale_are_blanked_in_their_own_layout() -> None:
    planar = _deidentified(frames=2, rgb=True, sop_class=dicom_uid.UltrasoundMultiFrameImageStorage)
    original = pixel_pattern(48, 64, 2, rgb=True)
    planar.PlanarConfiguration = 1
    planar.PixelData = original.transpose(0, 3, 1, 2).tobytes()
    assert apply_pixel_rules(planar, default_rules(banner_rows=4)).kind is PixelOutcomeKind.BLANKED
    mask = _mask(original.shape, Region(0, 0, 64, 4))
    after = _pixels(planar)
    assert (after[mask] == 0).all()
    assert (after[~mask] == original[~mask]).all()

    wide = _deidentified(rgb=False, sop_class=dicom_uid.CTImageStorage, modality="CT", burned_in="YES")
    values = (np.arange(48 * 64, dtype=np.uint16) + 300).reshape(1, 48, 64)
    wide.BitsAllocated, wide.BitsStored, wide.HighBit = 16, 12, 11
    wide.PixelData = values.tobytes()
    rule = PixelRule(regions=(Region(60, 0, 4, 48),), modality="CT")
    assert apply_pixel_rules(wide, (rule,)).kind is PixelOutcomeKind.BLANKED
    mask = _mask(values.shape, Region(60, 0, 4, 48))
    after = _pixels(wide)
    assert (after[mask] == 0).all()
    assert (after[~mask] == values[~mask]).all()


def test_uncompressed_ybr_full_422_is_blanked_in_whole_pixel_pairs() -> None:
    dataset = pydicom.dcmread(get_testdata_file("SC_ybr_full_422_uncompressed.dcm", read=False))  # type: ignore[arg-type]
    dataset.BurnedInAnnotation = "YES"
    before = bytes(dataset.PixelData)
    outcome = apply_pixel_rules(dataset, (PixelRule(regions=(Region(3, 0, 4, 2),)),))
    assert outcome.kind is PixelOutcomeKind.BLANKED
    rows = np.frombuffer(dataset.PixelData, dtype=np.uint8).reshape(100, 200)  # Y Y Cb Cr per pixel pair
    assert (rows[:2, 2 * 2 : 8 * 2] == 0).all()  # x 3..7 widened to the pairs 2..8
    original = np.frombuffer(before, dtype=np.uint8).reshape(100, 200)
    assert (rows[2:] == original[2:]).all()
    assert (rows[:2, 16:] == original[:2, 16:]).all()


def test_ultrasound_without_a_matching_rule_goes_to_quarantine_unchanged() -> None:
    dataset = _deidentified()
    before = dataset.PixelData
    rule = PixelRule(regions=(Region(0, 0, 10, 10),), manufacturer="Other Vendor")
    outcome = apply_pixel_rules(dataset, (rule,))
    assert outcome.kind is PixelOutcomeKind.QUARANTINE
    assert outcome.reason is QuarantineReason.NO_MATCHING_RULE
    assert dataset.PixelData is before
    assert "BurnedInAnnotation" not in dataset


def test_burned_in_annotation_yes_without_a_rule_goes_to_quarantine() -> None:
    dataset = _deidentified(
        rgb=False, sop_class=dicom_uid.SecondaryCaptureImageStorage, modality="OT", burned_in="YES"
    )
    outcome = apply_pixel_rules(dataset, default_rules())
    assert outcome.kind is PixelOutcomeKind.QUARANTINE
    assert outcome.reason is QuarantineReason.NO_MATCHING_RULE


def test_rule_size_mismatch_means_no_match() -> None:
    dataset = _deidentified()
    rule = PixelRule(regions=(Region(0, 0, 10, 10),), rows=480, columns=640)
    assert apply_pixel_rules(dataset, (rule,)).reason is QuarantineReason.NO_MATCHING_RULE


def test_compressed_ultrasound_is_quarantined_rather_than_re_encoded() -> None:
    path = get_testdata_file("examples_ybr_color.dcm", read=False)
    assert isinstance(path, str)
    dataset = validate(Path(path).read_bytes(), max_size=10**8).dataset
    outcome = apply_pixel_rules(dataset, default_rules())
    assert outcome.kind is PixelOutcomeKind.QUARANTINE
    assert outcome.reason is QuarantineReason.COMPRESSED_PIXEL_DATA


def test_images_without_burned_in_text_need_no_pixel_rules() -> None:
    dataset = _deidentified(rgb=False, sop_class=dicom_uid.CTImageStorage, modality="CT")
    before = dataset.PixelData
    assert apply_pixel_rules(dataset, ()).kind is PixelOutcomeKind.NOT_NEEDED
    assert dataset.PixelData is before
    explicit_no = _deidentified(rgb=False, sop_class=dicom_uid.CTImageStorage, modality="CT", burned_in="NO")
    assert apply_pixel_rules(explicit_no, ()).kind is PixelOutcomeKind.NOT_NEEDED


@pytest.mark.parametrize("name", ["SC_rgb_rle.dcm", "SC_rgb_rle_2frame.dcm", "MR_small_RLE.dcm"])
def test_rle_lossless_is_decoded_blanked_and_re_encoded_losslessly_as_rle(name: str) -> None:
    path = get_testdata_file(name, read=False)
    assert isinstance(path, str)
    dataset = pydicom.dcmread(path)
    dataset.BurnedInAnnotation = "YES"
    uid = dataset.SOPInstanceUID
    original = dataset.pixel_array.copy()
    outcome = apply_pixel_rules(dataset, (PixelRule(regions=(Region(2, 1, 10, 6),)),))
    assert outcome.kind is PixelOutcomeKind.BLANKED
    assert dataset.file_meta.TransferSyntaxUID == dicom_uid.RLELossless
    assert dataset.SOPInstanceUID == uid
    after = pydicom.dcmread(pydicom.filebase.DicomBytesIO(to_bytes(dataset))).pixel_array
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    before = original if frames > 1 else original[np.newaxis]
    after = after if frames > 1 else after[np.newaxis]
    mask = _mask(before.shape, Region(2, 1, 10, 6))
    assert (after[mask] == 0).all()
    assert (after[~mask] == before[~mask]).all()
