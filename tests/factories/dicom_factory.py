"""Synthetic DICOM instances of made-up patients, with PHI planted everywhere it may hide.

Every value is invented. ``planted`` lists each PHI string written, so a test can search the
de-identified bytes for all of them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np
from pydicom import uid as dicom_uid
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from phivault.dicom.profile_table import ATTRIBUTES

PATIENT_NAME = "Quixworth^Zelphine^Marguerite"
PATIENT_ID = "MRN-77341920"
ISSUER = "ST-ELSEWHERE-HOSP"
BIRTH_DATE = "19470312"
INSTITUTION = "Saint Elsewhere Quillfeather Hospital"
PRIVATE_CREATOR = "PHIVAULT TEST"
# Structural attributes the factory sets itself, so planting must not overwrite them.
_STRUCTURAL = {0x00080080, 0x00080018, 0x0020000D, 0x0020000E, 0x00100010, 0x00100020, 0x00100021, 0x00100030}
_PLANTED_VRS = {
    "PN",
    "LO",
    "SH",
    "LT",
    "ST",
    "UT",
    "UC",
    "CS",
    "AE",
    "DA",
    "DT",
    "TM",
    "DS",
    "IS",
    "AS",
    "SQ",
}


@dataclass
class Planted:
    """The PHI strings written into one instance."""

    values: list[str] = field(default_factory=list)

    def add(self, value: str) -> str:
        self.values.append(value)
        return value


def _value_for(vr: str, n: int, planted: Planted) -> str:
    # Each value is unique and long enough not to occur by chance in other bytes.
    day = date(1931, 1, 1) + timedelta(days=n * 37)
    values = {
        "PN": f"Phiname{n:04d}^Given{n:04d}",
        "CS": f"PHICS{n:04d}",
        "AE": f"PHIAE{n:04d}",
        "DA": day.strftime("%Y%m%d"),
        "DT": day.strftime("%Y%m%d") + "231559",
        "TM": f"2359{n % 60:02d}.{n:06d}",
        "DS": f"{n}.987654",
        "IS": f"9{n:05d}7",
        "AS": f"{n % 90 + 10:03d}Y",
        "SH": f"PHISH{n:04d}Zelq",
    }
    return planted.add(values.get(vr, f"PHI text {n:04d} of Zelphine"))


def _nested_item(n: int, planted: Planted) -> Dataset:
    item = Dataset()
    item.PatientName = planted.add(f"Nestedname{n:04d}^Zelphine")
    item.ReferringPhysicianName = planted.add(f"Drnested{n:04d}^Orvald")
    item.StudyDate = planted.add((date(1932, 2, 2) + timedelta(days=n)).strftime("%Y%m%d"))
    item.CodeValue = "T-D1100"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Body"
    return item


def make_instance(  # noqa: PLR0913 — every knob a test turns is a keyword
    *,
    study_uid: str = "1.2.826.0.1.3680043.10.1444.1.1",
    series_uid: str = "1.2.826.0.1.3680043.10.1444.1.1.1",
    sop_uid: str = "1.2.826.0.1.3680043.10.1444.1.1.1.1",
    sop_class: str = dicom_uid.UltrasoundImageStorage,
    modality: str = "US",
    rows: int = 48,
    columns: int = 64,
    frames: int = 1,
    rgb: bool = True,
    manufacturer: str = "Acme Sonics",
    model: str = "Sono 5000",
    burned_in: str | None = None,
    plant_phi: bool = True,
) -> tuple[Dataset, Planted]:
    """One uncompressed (Explicit VR Little Endian) image instance and the PHI planted in it."""
    planted = Planted()
    ds = Dataset()
    if plant_phi:
        _plant_profile_attributes(ds, planted)
        _plant_private(ds, planted)
        region = Dataset()
        region.CodeValue = "T-D4000"
        region.CodingSchemeDesignator = "SRT"
        region.CodeMeaning = "Abdomen"
        region.ReferringPhysicianName = planted.add("Drinkept^Hieronyma")
        region.PatientBirthDate = planted.add("19390707")
        ds.AnatomicRegionSequence = Sequence([region])  # not in Table E.1-1: kept, cleaned inside
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study_uid + ".9"
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.PatientName = planted.add(PATIENT_NAME) if plant_phi else "Anon^Test"
    ds.PatientID = planted.add(PATIENT_ID) if plant_phi else "TEST-1"
    if plant_phi:
        ds.IssuerOfPatientID = planted.add(ISSUER)
        ds.PatientBirthDate = planted.add(BIRTH_DATE)
        ds.InstitutionName = planted.add(INSTITUTION)
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    _set_pixels(ds, rows=rows, columns=columns, frames=frames, rgb=rgb)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = dicom_uid.UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = dicom_uid.UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = dicom_uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.SourceApplicationEntityTitle = planted.add("PHISRCAE") if plant_phi else "TEST"
    return ds, planted


def pixel_pattern(rows: int, columns: int, frames: int, *, rgb: bool) -> np.ndarray:
    """Pixel values that are never zero, so blanked regions stand out."""
    shape = (frames, rows, columns, 3) if rgb else (frames, rows, columns)
    return (np.arange(int(np.prod(shape)), dtype=np.uint32) % 250 + 1).astype(np.uint8).reshape(shape)


def _set_pixels(ds: Dataset, *, rows: int, columns: int, frames: int, rgb: bool) -> None:
    pixels = pixel_pattern(rows, columns, frames, rgb=rgb)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()


def _plant_profile_attributes(ds: Dataset, planted: Planted) -> None:
    for n, attribute in enumerate(ATTRIBUTES):
        if "X" in attribute.tag or attribute.tag.startswith("(GGGG"):
            continue
        tag = int(attribute.tag[1:5] + attribute.tag[6:10], 16)
        if tag >> 16 in (0x0000, 0x0002) or tag in _STRUCTURAL:
            continue
        try:
            vr = dictionary_VR(tag)
            keyword = keyword_for_tag(tag)
        except KeyError:
            continue
        if vr not in _PLANTED_VRS or not keyword:
            continue
        if vr == "SQ":
            ds[tag] = DataElement(tag, "SQ", Sequence([_nested_item(n, planted)]))
        else:
            ds[tag] = DataElement(tag, vr, _value_for(vr, n, planted))


def _plant_private(ds: Dataset, planted: Planted) -> None:
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", planted.add("Private Zelphine Quixworth"))
    block.add_new(0x02, "LO", planted.add("SAFE-DEVICE-SETTING-42"))
    item = Dataset()
    item.PatientName = planted.add("Privnested^Zelphine")
    block.add_new(0x03, "SQ", Sequence([item]))


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def phi_left_in(output: bytes, phi_values: list[str] | tuple[str, ...]) -> list[str]:
    """The PHI strings found in ``output``: in its raw bytes or in any decoded text value."""
    from pydicom import dcmread  # noqa: PLC0415 — only this helper reads files back

    texts: list[str] = [output.decode("latin-1")]
    dataset = dcmread(io.BytesIO(output))
    texts.extend(str(element.value) for element in dataset.iterall() if element.VR != "SQ")
    texts.extend(str(element.value) for element in dataset.file_meta)
    raw = output
    return [value for value in phi_values if value.encode() in raw or any(value in text for text in texts)]
