"""Rendered images for viewers (PS3.18 §8.3.5 rendered resources, §9.5 ``/rendered``).

One frame becomes a JPEG or PNG: the Modality LUT (Rescale Slope/Intercept) and a VOI
window (the request's ``window``, else the instance's Window Center/Width, else the frame's
range; PS3.3 C.11.2.1.2 functions LINEAR, LINEAR_EXACT, SIGMOID) for grayscale, MONOCHROME1
inverted; colour frames as RGB (YBR converted, palette colour looked up).

The image carries pixels and nothing else: Pillow writes no EXIF, comment or text chunk
unless asked, and nothing of the DICOM header is passed to it, so a rendered image holds no
PHI in its metadata whoever asked for it. Burned-in text was dealt with at ingest.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import numpy as np
from PIL import Image
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut

JPEG: Final = "image/jpeg"
PNG: Final = "image/png"
MAX_VIEWPORT: Final = 4096
_PIXEL_MODULE: Final = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
)


class RenderingUnavailable(ValueError):
    """This frame cannot be rendered here (no decoder for its transfer syntax, or no image)."""


class VoiFunction(StrEnum):
    LINEAR = "linear"
    LINEAR_EXACT = "linear-exact"
    SIGMOID = "sigmoid"


@dataclass(frozen=True, slots=True)
class Window:
    center: float
    width: float
    function: VoiFunction = VoiFunction.LINEAR


@dataclass(frozen=True, slots=True)
class RenderOptions:
    media_type: str = JPEG
    quality: int = 90  # JPEG quality, 1-100
    window: Window | None = None
    viewport: tuple[int, int] | None = None  # fit inside (width, height), keeping the aspect


def decode_frame(header: Dataset, frame: bytes, transfer_syntax_uid: str) -> np.ndarray:
    """One frame as an array (rows, columns[, samples]); YBR converted to RGB."""
    syntax = dicom_uid.UID(transfer_syntax_uid)
    single = Dataset()
    for keyword in _PIXEL_MODULE:
        if keyword in header:
            single[keyword] = header[keyword]
    single.NumberOfFrames = 1
    single.file_meta = FileMetaDataset()
    if syntax.is_encapsulated:
        single.file_meta.TransferSyntaxUID = syntax
        single.PixelData = encapsulate([frame])
    else:  # native frames are handed over little endian (layout.read_frames)
        single.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
        single.PixelData = frame
    try:
        decoder = get_decoder(single.file_meta.TransferSyntaxUID)
        array, _ = decoder.as_array(single)  # as_rgb by default: YBR becomes RGB
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, KeyError) as exc:
        raise RenderingUnavailable("this frame cannot be decoded here") from exc
    return np.asarray(array)


def _voi(values: np.ndarray, window: Window) -> np.ndarray:
    center, width = window.center, max(window.width, 1.0)
    if window.function is VoiFunction.SIGMOID:  # PS3.3 C.11.2.1.3.1
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if window.function is VoiFunction.LINEAR_EXACT:  # PS3.3 C.11.2.1.3.2
        return np.clip((values - center) / width + 0.5, 0.0, 1.0) * 255.0
    width = max(width, 2.0)  # PS3.3 C.11.2.1.2.1: width >= 1, and (w - 1) divides
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0) * 255.0


def _first(header: Dataset, keyword: str) -> float | None:
    value = header.get(keyword)
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if value else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _grayscale(header: Dataset, array: np.ndarray, window: Window | None) -> np.ndarray:
    values = np.asarray(apply_modality_lut(array, header), dtype=np.float64)
    if window is None:
        center, width = _first(header, "WindowCenter"), _first(header, "WindowWidth")
        if center is not None and width is not None and width > 0:
            window = Window(center, width)
        else:
            low, high = float(values.min()), float(values.max())
            window = Window((low + high) / 2.0, max(high - low, 1.0), VoiFunction.LINEAR_EXACT)
    shown: np.ndarray = _voi(values, window)
    if str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        shown = 255.0 - shown
    return np.asarray(np.rint(shown), dtype=np.uint8)


def _colour(header: Dataset, array: np.ndarray) -> np.ndarray:
    if str(header.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        array = np.asarray(apply_color_lut(array, header))
    if array.dtype != np.uint8:
        bits = int(header.get("BitsStored", 8) or 8)
        array = (array.astype(np.float64) * (255.0 / max((1 << bits) - 1, 1))).clip(0, 255)
    return np.asarray(array, dtype=np.uint8)


def render(header: Dataset, array: np.ndarray, options: RenderOptions) -> bytes:
    """The frame ``array`` of ``header``'s image as ``options.media_type`` bytes."""
    try:
        return _render(header, array, options)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OSError) as exc:
        # An attribute this rendering reads is missing or out of range (a LUT, a window).
        raise RenderingUnavailable("this frame cannot be rendered") from exc


def _render(header: Dataset, array: np.ndarray, options: RenderOptions) -> bytes:
    photometric = str(header.get("PhotometricInterpretation", ""))
    if photometric.startswith("MONOCHROME"):
        image = Image.fromarray(_grayscale(header, array, options.window))
    elif (array.ndim == 3 and array.shape[-1] == 3) or photometric == "PALETTE COLOR":  # noqa: PLR2004
        image = Image.fromarray(_colour(header, array))
    else:
        raise RenderingUnavailable(f"photometric interpretation {photometric[:16]} is not rendered")
    if options.viewport is not None:
        image.thumbnail(options.viewport, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if options.media_type == PNG:
        image.save(buffer, format="PNG", optimize=False)
    else:
        image.save(buffer, format="JPEG", quality=options.quality)
    return buffer.getvalue()
