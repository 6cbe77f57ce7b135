"""Re-identification puts back every text value de-identification removed, and the UIDs."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from factories.dicom_factory import PATIENT_ID, PATIENT_NAME, make_instance, to_bytes
from phivault.dicom.deid import DeidOptions, deidentify, text_value
from phivault.dicom.phi import PhiRecord, extract_phi
from phivault.dicom.reid import PhiPathError, reidentify
from phivault.dicom.uids import remap_uid

SECRET = b"r" * 32


def _texts(dataset: Dataset, prefix: str = "") -> dict[str, str]:
    found: dict[str, str] = {}
    for element in dataset:
        path = f"{prefix}({element.tag.group:04X},{element.tag.element:04X})"
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                found.update(_texts(item, f"{path}[{index}]"))
        else:
            text = text_value(element)
            if text is not None:
                found[path] = text
    return found


def _round_trip(options: DeidOptions) -> tuple[Dataset, Dataset]:
    original = dcmread(io.BytesIO(to_bytes(make_instance()[0])))
    stored = deidentify(original, options=options, institution_secret=SECRET, pseudonym="pseudo-7")
    uids = {
        remap_uid(uid, SECRET): uid
        for uid in (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    }
    restored = reidentify(stored, extract_phi(original), uids)
    written = io.BytesIO()
    restored.save_as(written, enforce_file_format=True)
    return original, dcmread(io.BytesIO(written.getvalue()))


@pytest.mark.parametrize(
    "options",
    [DeidOptions(), DeidOptions(retain_modified_dates=True, clean_descriptors=True)],
    ids=["basic", "modified-dates-clean-descriptors"],
)
def test_every_text_value_comes_back_at_its_path(options: DeidOptions) -> None:
    original, restored = _round_trip(options)
    before, after = _texts(original), _texts(restored)
    changed = {path for path in before if after.get(path) != before[path]}
    assert changed == set()
    assert restored.PatientName == PATIENT_NAME
    assert restored.PatientID == PATIENT_ID


def test_original_uids_and_file_meta_come_back(tmp_path: object) -> None:
    del tmp_path
    original, restored = _round_trip(DeidOptions())
    assert restored.StudyInstanceUID == original.StudyInstanceUID
    assert restored.SOPInstanceUID == original.SOPInstanceUID
    assert restored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert restored.file_meta.SourceApplicationEntityTitle == original.file_meta.SourceApplicationEntityTitle
    # UIDs outside the map stay the institution's remapped ones
    assert restored.FrameOfReferenceUID == remap_uid(original.FrameOfReferenceUID, SECRET)


def test_the_result_no_longer_claims_to_be_deidentified() -> None:
    _, restored = _round_trip(DeidOptions(retain_modified_dates=True))
    assert restored.PatientIdentityRemoved == "NO"
    assert "DeidentificationMethodCodeSequence" not in restored
    assert "LongitudinalTemporalInformationModified" not in restored


def test_removed_sequences_and_private_elements_are_created_again() -> None:
    stored = Dataset()
    stored.PatientName = "pseudo"
    stored.PatientID = "pseudo"
    phi = PhiRecord(
        patient_name="Doe^Jane",
        other=(
            ("(0040,0275)[1](0032,1060)", "Requested thing"),
            ("(0009,0010)", "ACME"),
            ("(0009,1001)", "a private value"),
            ("(0008,1030)", "first\\second"),
        ),
    )
    restored = reidentify(stored, phi, {})
    assert len(restored.RequestAttributesSequence) == 2
    assert restored.RequestAttributesSequence[1].RequestedProcedureDescription == "Requested thing"
    assert restored[0x00090010].value == "ACME"
    assert restored[0x00091001].VR == "LO"
    assert list(restored.StudyDescription) == ["first", "second"]
    assert stored.PatientName == "pseudo", "the input is not modified"


@pytest.mark.parametrize("path", ["(0010,0010", "(0040,0275)(0032,1060)", "(0040,0275)[0]", "junk"])
def test_a_path_extract_phi_cannot_make_is_refused(path: str) -> None:
    with pytest.raises(PhiPathError):
        reidentify(Dataset(), PhiRecord(other=((path, "x"),)), {})
