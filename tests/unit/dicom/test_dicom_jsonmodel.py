"""DICOM JSON (PS3.18 Annex F) written by DicomJsonObject matches what pydicom writes."""

from __future__ import annotations

from pydicom.dataset import Dataset

from phivault.dicom.jsonmodel import DicomJsonObject


def test_the_same_json_as_pydicom_for_the_vrs_qido_answers() -> None:
    ours = DicomJsonObject()
    theirs = Dataset()
    values: dict[str, str | int | list[str] | None] = {
        "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "PatientID": "MRN-1",
        "StudyDate": "20240105",
        "ModalitiesInStudy": ["US", "OT"],
        "NumberOfStudyRelatedInstances": 12,
        "SeriesNumber": "3",
        "Rows": 480,
        "RetrieveURL": "https://example.org/dicomweb/studies/1.2",
        "AccessionNumber": None,
    }
    for keyword, value in values.items():
        ours.set(keyword, value)
        setattr(theirs, keyword, value)
    assert ours.to_json() == theirs.to_json_dict()


def test_keep_drops_everything_else() -> None:
    answer = DicomJsonObject()
    answer.set("PatientID", "x")
    answer.set("StudyDate", "20240101")
    answer.keep({0x00100020})
    assert list(answer.to_json()) == ["00100020"]
    assert answer.value("PatientID") == "x"
