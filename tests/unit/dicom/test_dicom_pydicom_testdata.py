"""pydicom's bundled real-world files go through validate → extract → de-identify → pixel rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from factories.dicom_factory import phi_left_in, to_bytes
from phivault.dicom import (
    DeidOptions,
    PixelOutcomeKind,
    apply_pixel_rules,
    default_rules,
    deidentify,
    extract_phi,
    validate,
)
from phivault.dicom.deid import profile_attribute, text_value

SECRET = b"institution-one-secret-32-bytes!"
# Files bundled with pydicom 3.0.2 (US1_UNCR.dcm is only downloadable, so not used offline).
FILES = [
    "examples_ybr_color.dcm",  # 30-frame ultrasound, JPEG baseline
    "examples_rgb_color.dcm",  # ultrasound, RGB, uncompressed
    "examples_palette.dcm",  # ultrasound, palette colour
    "examples_jpeg2k.dcm",  # ultrasound, JPEG 2000 lossless
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_small_odd.dcm",
    "SC_rgb_rle.dcm",
    "JPEG-lossy.dcm",
    "image_dfl.dcm",  # deflated explicit VR little endian
]
_LETTERS = re.compile(r"[A-Za-z].*[A-Za-z].*[A-Za-z]")


def _read(name: str) -> bytes:
    path = get_testdata_file(name, read=False)
    assert isinstance(path, str), name
    return Path(path).read_bytes()


@pytest.mark.parametrize("name", FILES)
def test_bundled_file_is_ingested_and_de_identified_without_phi_left(name: str) -> None:
    instance = validate(_read(name), max_size=10**8)
    phi = extract_phi(instance.dataset)
    assert phi.patient_name or phi.patient_id
    output = deidentify(instance.dataset, options=DeidOptions(), institution_secret=SECRET, pseudonym="pt_x")
    outcome = apply_pixel_rules(output, default_rules())
    data = to_bytes(output)

    # Values of attributes the profile keeps (Manufacturer …) may repeat a removed value;
    # that text was never PHI. Everything else the PHI store took must be gone.
    # (MR_small: Institution Name "TOSHIBA", Manufacturer "TOSHIBA_MEC".)
    kept = [
        text
        for element in output.iterall()
        if not element.tag.is_private
        and profile_attribute(int(element.tag)) is None
        and (text := text_value(element)) is not None
    ]
    named = [value for value in phi.values() if _LETTERS.search(value) and not any(value in k for k in kept)]
    assert phi_left_in(data, named) == []

    reread = validate(data, max_size=10**8)  # the output is itself a strictly valid file
    assert reread.transfer_syntax_uid == instance.transfer_syntax_uid
    assert reread.study_instance_uid.startswith("2.25.")
    if outcome.kind is PixelOutcomeKind.NOT_NEEDED:
        assert reread.dataset.PixelData == instance.dataset.PixelData  # kept as received
