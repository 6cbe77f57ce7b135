"""Rendering one frame: the VOI window functions of PS3.3 C.11.2, MONOCHROME1, colour, and
images that carry no metadata.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from phivault.dicom.render import (
    PNG,
    RenderingUnavailable,
    RenderOptions,
    VoiFunction,
    Window,
    decode_frame,
    render,
)


def _grayscale(bits: int = 16, photometric: str = "MONOCHROME2") -> Dataset:
    header = Dataset()
    header.Rows, header.Columns = 2, 3
    header.SamplesPerPixel = 1
    header.PhotometricInterpretation = photometric
    header.BitsAllocated, header.BitsStored, header.HighBit = bits, bits, bits - 1
    header.PixelRepresentation = 0
    header.PatientName = "Quixworth^Zelphine"
    return header


def _pixels(image: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image)))


def test_linear_window_with_rescale() -> None:
    header = _grayscale()
    header.RescaleSlope, header.RescaleIntercept = 2, -1000
    frame = np.array([[0, 250, 500], [750, 1000, 1250]], dtype="<u2")
    array = decode_frame(header, frame.tobytes(), "1.2.840.10008.1.2.1")
    assert array.tolist() == frame.tolist()
    shown = _pixels(render(header, array, RenderOptions(PNG, window=Window(0, 1000))))
    # values -1000, -500, 0, 500, 1000, 1500 under centre 0, width 1000 (PS3.3 C.11.2.1.2.1)
    assert shown.tolist() == [[0, 0, 128], [255, 255, 255]]


def test_window_functions_and_monochrome1() -> None:
    header = _grayscale(8, "MONOCHROME1")
    array = np.array([[0, 100, 128], [156, 200, 255]], dtype=np.uint8)
    exact = _pixels(
        render(header, array, RenderOptions(PNG, window=Window(128, 256, VoiFunction.LINEAR_EXACT)))
    )
    assert exact.tolist() == [[255, 155, 128], [100, 56, 1]]  # 255 - ((x - c) / w + 0.5) * 255, rounded
    sigmoid = _pixels(render(header, array, RenderOptions(PNG, window=Window(128, 64, VoiFunction.SIGMOID))))
    assert sigmoid[0, 2] == 128  # 255 - 255 / 2, rounded to even
    assert sigmoid[0, 0] > 250
    assert sigmoid[1, 2] < 5


def test_the_instances_window_then_the_frames_range() -> None:
    header = _grayscale(8)
    array = np.array([[10, 20, 30], [40, 50, 60]], dtype=np.uint8)
    auto = _pixels(render(header, array, RenderOptions(PNG)))
    assert (auto.min(), auto.max()) == (0, 255)
    header.WindowCenter, header.WindowWidth = [128, 40], [256, 80]  # the first pair is used
    kept = _pixels(render(header, array, RenderOptions(PNG)))
    assert abs(int(kept[0, 0]) - 10) <= 1


def test_colour_stays_colour_and_images_carry_no_metadata() -> None:
    header = Dataset()
    header.Rows, header.Columns, header.SamplesPerPixel = 2, 2, 3
    header.PhotometricInterpretation = "RGB"
    header.BitsAllocated, header.BitsStored, header.HighBit, header.PixelRepresentation = 8, 8, 7, 0
    header.PlanarConfiguration = 0
    header.PatientName = "Quixworth^Zelphine"
    frame = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    array = decode_frame(header, frame.tobytes(), "1.2.840.10008.1.2.1")
    for media_type in ("image/png", "image/jpeg"):
        image = render(header, array, RenderOptions(media_type, quality=100))
        assert b"Quixworth" not in image
        opened = Image.open(io.BytesIO(image))
        assert opened.mode == "RGB"
        assert "exif" not in opened.info
        assert "comment" not in opened.info
    assert _pixels(render(header, array, RenderOptions(PNG))).tolist() == frame.tolist()


def test_what_cannot_be_rendered_says_so() -> None:
    palette = _grayscale(8, "PALETTE COLOR")  # no lookup table
    with pytest.raises(RenderingUnavailable):
        render(palette, np.zeros((2, 3), dtype=np.uint8), RenderOptions(PNG))
    with pytest.raises(RenderingUnavailable):
        decode_frame(_grayscale(8), b"not a jpeg", "1.2.840.10008.1.2.4.50")
