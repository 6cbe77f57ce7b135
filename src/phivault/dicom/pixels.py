"""Burned-in text: blank known regions of the pixel data, or quarantine the instance.

Ultrasound devices and screen captures burn patient names and dates into the image
(PS3.15 E.3.1, Clean Pixel Data Option). An instance that says so (BurnedInAnnotation YES)
and every ultrasound instance must match a rule; without one it goes to quarantine and is
never stored as de-identified.

Blanking writes zero into the regions of every frame and every sample, straight into the
native (uncompressed) PixelData bytes: zero is zero in either byte order and for signed
samples, so no decoding or colour conversion is involved and the transfer syntax stays.
RLE Lossless is the one compressed transfer syntax handled: pydicom decodes and encodes it
with numpy alone, losslessly, and the result keeps RLE Lossless. Every other compressed
transfer syntax is quarantined: no JPEG / JPEG-LS / JPEG 2000 / video codec is installed,
and re-encoding the lossy JPEG that devices send would degrade the images further.

On ingest the native value is not in memory (``part10.StreamedPixelData``): the same
blanking is then attached to it and done one frame at a time while the file is written, so
memory does not grow with the number of frames. RLE Lossless is decoded in memory as before.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, RLELossless

from phivault.dicom.deid import CLEAN_PIXEL_DATA_CODE, add_method_code
from phivault.dicom.part10 import StreamedPixelData
from phivault.dicom.validation import ULTRASOUND_SOP_CLASSES

DEFAULT_BANNER_ROWS: Final = 60  # typical height of an ultrasound scanner's top banner


class Region(NamedTuple):
    """A rectangle in pixels; it is clipped to the image."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class PixelRule:
    """Where one device model burns text in: blank ``regions`` on matching images.

    ``manufacturer`` (case-insensitive, exact) and ``modality`` of None match any;
    ``model_pattern`` is a shell pattern on Manufacturer's Model Name; ``rows``/``columns``
    of None match any size.
    """

    regions: tuple[Region, ...]
    manufacturer: str | None = None
    model_pattern: str = "*"
    rows: int | None = None
    columns: int | None = None
    modality: str | None = None

    def matches(self, dataset: Dataset) -> bool:
        manufacturer = str(dataset.get("Manufacturer", "") or "")
        model = str(dataset.get("ManufacturerModelName", "") or "")
        modality = str(dataset.get("Modality", "") or "")
        return (
            (self.manufacturer is None or self.manufacturer.casefold() == manufacturer.casefold())
            and fnmatch.fnmatchcase(model.casefold(), self.model_pattern.casefold())
            and (self.modality is None or self.modality == modality)
            and (self.rows is None or self.rows == dataset.get("Rows"))
            and (self.columns is None or self.columns == dataset.get("Columns"))
        )


def default_rules(banner_rows: int = DEFAULT_BANNER_ROWS) -> tuple[PixelRule, ...]:
    """Blank the top ``banner_rows`` of every ultrasound image, whichever the device."""
    return (PixelRule(regions=(Region(0, 0, 0xFFFF, banner_rows),), modality="US"),)


class PixelOutcomeKind(StrEnum):
    BLANKED = "blanked"
    QUARANTINE = "quarantine"
    NOT_NEEDED = "not_needed"


class QuarantineReason(StrEnum):
    NO_MATCHING_RULE = "no_matching_rule"
    COMPRESSED_PIXEL_DATA = "compressed_pixel_data"
    UNSUPPORTED_PIXEL_LAYOUT = "unsupported_pixel_layout"
    UNDECODABLE_PIXEL_DATA = "undecodable_pixel_data"


@dataclass(frozen=True, slots=True)
class PixelOutcome:
    kind: PixelOutcomeKind
    reason: QuarantineReason | None = None
    rule: PixelRule | None = None


def needs_pixel_rules(dataset: Dataset) -> bool:
    """Whether burned-in text must be dealt with before the instance may be stored."""
    if "PixelData" not in dataset:
        return False
    burned_in = str(dataset.get("BurnedInAnnotation", "") or "").upper() == "YES"
    ultrasound = (
        str(dataset.get("SOPClassUID", "")) in ULTRASOUND_SOP_CLASSES or dataset.get("Modality") == "US"
    )
    return burned_in or ultrasound


def apply_pixel_rules(dataset: Dataset, rules: tuple[PixelRule, ...]) -> PixelOutcome:
    """Blank burned-in text in place with the first matching rule, or say why not.

    Only a BLANKED outcome changes ``dataset`` (PixelData, BurnedInAnnotation = NO and the
    Clean Pixel Data Option code, CID 7050 113101). Call it on the de-identified copy.
    """
    if not needs_pixel_rules(dataset):
        return PixelOutcome(PixelOutcomeKind.NOT_NEEDED)
    rule = next((rule for rule in rules if rule.matches(dataset)), None)
    if rule is None:
        return PixelOutcome(PixelOutcomeKind.QUARANTINE, QuarantineReason.NO_MATCHING_RULE)
    transfer_syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "")))
    if transfer_syntax.is_compressed and transfer_syntax != RLELossless:
        return PixelOutcome(PixelOutcomeKind.QUARANTINE, QuarantineReason.COMPRESSED_PIXEL_DATA, rule)
    try:
        return _blank_with(dataset, rule, rle=transfer_syntax == RLELossless)
    except Exception:  # noqa: BLE001  # hostile pixel data: whatever the decoder raises, it is quarantined
        # Found by fuzzing: corrupt encapsulated data makes pydicom's decoders raise
        # ValueError and others. Undecodable pixels are never stored as de-identified.
        return PixelOutcome(PixelOutcomeKind.QUARANTINE, QuarantineReason.UNDECODABLE_PIXEL_DATA, rule)


def _blank_with(dataset: Dataset, rule: PixelRule, *, rle: bool) -> PixelOutcome:
    value = dataset["PixelData"].value
    if rle:
        if isinstance(value, StreamedPixelData):  # the codec needs the whole value
            dataset.PixelData = value.span.read_all()
        _blank_rle(dataset, rule)
        return _blanked(dataset, rule)
    if isinstance(value, StreamedPixelData):
        layout = _frame_layout(dataset, value.length)
        if layout is None:
            return PixelOutcome(PixelOutcomeKind.QUARANTINE, QuarantineReason.UNSUPPORTED_PIXEL_LAYOUT, rule)
        value.transform = FrameBlanking(layout, rule.regions)
        return _blanked(dataset, rule)
    frames = _frames_view(dataset)
    if frames is None:
        return PixelOutcome(PixelOutcomeKind.QUARANTINE, QuarantineReason.UNSUPPORTED_PIXEL_LAYOUT, rule)
    buffer, array, bytes_per_pixel, pixel_pairs = frames
    dataset.PixelData = b""  # let go of the received value before making the new one
    for region in rule.regions:
        _blank(array, region, bytes_per_pixel=bytes_per_pixel, pixel_pairs=pixel_pairs)
    del array
    # pydicom takes OB/OW values as bytes (a bytearray would become a list of numbers).
    dataset.PixelData = bytes(buffer)
    return _blanked(dataset, rule)


def _blanked(dataset: Dataset, rule: PixelRule) -> PixelOutcome:
    dataset.BurnedInAnnotation = "NO"
    add_method_code(dataset, CLEAN_PIXEL_DATA_CODE)
    return PixelOutcome(PixelOutcomeKind.BLANKED, rule=rule)


def _blank_rle(dataset: Dataset, rule: PixelRule) -> None:
    """Decode, blank and re-encode RLE Lossless (PS3.5 Annex G): lossless both ways."""
    # raw=True: no colour-space conversion, so the samples go back as they came.
    decoded = pixel_array(dataset, raw=True)
    frames = decoded if int(dataset.get("NumberOfFrames", 1) or 1) > 1 else decoded[np.newaxis]
    array = frames.copy()
    rows, columns = array.shape[1], array.shape[2]
    for region in rule.regions:
        x0, y0 = max(region.x, 0), max(region.y, 0)
        x1, y1 = min(region.x + region.width, columns), min(region.y + region.height, rows)
        if x0 < x1 and y0 < y1:
            array[:, y0:y1, x0:x1] = 0
    result = array if decoded.ndim == array.ndim else array[0]
    # The SOP Instance UID stays: the de-identified instance already has its remapped UID.
    dataset.compress(RLELossless, result, generate_instance_uid=False)


@dataclass(frozen=True, slots=True)
class FrameLayout:
    """How native frames lie in Pixel Data: each is ``planes`` planes of ``rows`` rows of
    ``columns * bytes_per_pixel`` bytes; bytes past the frames stay as they are.
    """

    frames: int
    planes: int
    rows: int
    columns: int
    bytes_per_pixel: int
    pixel_pairs: bool

    @property
    def frame_size(self) -> int:
        return self.planes * self.rows * self.columns * self.bytes_per_pixel

    def shape(self, frames: int) -> tuple[int, int, int, int]:
        return (frames, self.planes, self.rows, self.columns * self.bytes_per_pixel)


def _frame_layout(dataset: Dataset, value_length: int) -> FrameLayout | None:
    """The layout of native Pixel Data of ``value_length`` bytes, if it can be blanked."""
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    bits_allocated = int(dataset.get("BitsAllocated", 0))
    samples = int(dataset.get("SamplesPerPixel", 1))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    planar = int(dataset.get("PlanarConfiguration", 0) or 0)
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    if rows <= 0 or columns <= 0 or bits_allocated % 8 or bits_allocated == 0:
        return None  # 1-bit packed data would need bit arithmetic; not produced by our devices
    bytes_per_sample = bits_allocated // 8
    pixel_pairs = photometric == "YBR_FULL_422"
    if pixel_pairs:
        # PS3.3 C.7.6.3.1.2: two pixels share one Cb and Cr (Y Y Cb Cr), 2 samples per pixel.
        if columns % 2:
            return None
        planes, bytes_per_pixel = 1, 2 * bytes_per_sample
    elif planar == 1:
        planes, bytes_per_pixel = samples, bytes_per_sample
    else:
        planes, bytes_per_pixel = 1, samples * bytes_per_sample
    layout = FrameLayout(frames, planes, rows, columns, bytes_per_pixel, pixel_pairs)
    if value_length < frames * layout.frame_size:
        return None
    return layout


class FrameBlanking:
    """Blanks a rule's regions in one native frame at a time (``part10.FrameTransform``)."""

    def __init__(self, layout: FrameLayout, regions: tuple[Region, ...]) -> None:
        self._layout = layout
        self._regions = regions

    @property
    def frame_size(self) -> int:
        return self._layout.frame_size

    @property
    def frames(self) -> int:
        return self._layout.frames

    def __call__(self, frame: bytearray) -> None:
        layout = self._layout
        array = np.frombuffer(frame, dtype=np.uint8).reshape(layout.shape(1))
        for region in self._regions:
            _blank(array, region, bytes_per_pixel=layout.bytes_per_pixel, pixel_pairs=layout.pixel_pairs)


def _frames_view(dataset: Dataset) -> tuple[bytearray, np.ndarray, int, bool] | None:
    """A writable copy of the native pixel bytes, and a view of it shaped (frames, planes,
    rows, columns * bytes per pixel); trailing bytes past the frames stay as they were.
    """
    data = dataset.PixelData
    layout = _frame_layout(dataset, len(data))
    if layout is None:
        return None
    buffer = bytearray(data)
    del data
    array = np.frombuffer(buffer, dtype=np.uint8, count=layout.frames * layout.frame_size).reshape(
        layout.shape(layout.frames)
    )
    return buffer, array, layout.bytes_per_pixel, layout.pixel_pairs


def _blank(array: np.ndarray, region: Region, *, bytes_per_pixel: int, pixel_pairs: bool) -> None:
    rows, row_bytes = array.shape[2], array.shape[3]
    columns = row_bytes // bytes_per_pixel
    x0, y0 = max(region.x, 0), max(region.y, 0)
    x1, y1 = min(region.x + region.width, columns), min(region.y + region.height, rows)
    if pixel_pairs:  # widen to whole pairs, so no half-blanked chroma remains
        x0, x1 = x0 - x0 % 2, x1 + x1 % 2
    if x0 >= x1 or y0 >= y1:
        return
    array[:, :, y0:y1, x0 * bytes_per_pixel : x1 * bytes_per_pixel] = 0
