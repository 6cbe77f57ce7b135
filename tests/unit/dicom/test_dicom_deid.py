"""De-identification per PS3.15 Annex E: no planted PHI survives, actions and options per the standard."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from factories.dicom_factory import (
    BIRTH_DATE,
    INSTITUTION,
    ISSUER,
    PATIENT_ID,
    PATIENT_NAME,
    PRIVATE_CREATOR,
    make_instance,
    phi_left_in,
    to_bytes,
)
from phivault.dicom import DeidOptions, PrivateTag, applied_codes, deidentify, extract_phi, validate
from phivault.dicom.deid import Action, profile_attribute, resolve_action
from phivault.dicom.profile_table import ATTRIBUTES
from phivault.dicom.uids import patient_date_offset_days, remap_uid

SECRET = b"institution-one-secret-32-bytes!"
OTHER_SECRET = b"institution-two-secret-32-bytes!"
PSEUDONYM = "pt_01HZX4K9Q2M3"
MAX = 50_000_000
METHOD_TAGS = {Tag(0x0012, 0x0062), Tag(0x0012, 0x0063), Tag(0x0012, 0x0064), Tag(0x0028, 0x0303)}


def _deid(dataset: Dataset, options: DeidOptions | None = None, secret: bytes = SECRET) -> Dataset:
    return deidentify(
        dataset, options=options or DeidOptions(), institution_secret=secret, pseudonym=PSEUDONYM
    )


def _ingested(**kwargs: object) -> tuple[Dataset, list[str]]:
    dataset, planted = make_instance(**kwargs)  # type: ignore[arg-type]
    return validate(to_bytes(dataset), max_size=MAX).dataset, planted.values


def test_no_planted_phi_string_survives_in_any_byte_or_decoded_value_of_the_output() -> None:
    dataset, planted = _ingested()
    assert len(planted) > 400  # every applicable row of Table E.1-1, private tags, sequences
    output = to_bytes(_deid(dataset))
    assert phi_left_in(output, planted) == []


def test_no_planted_phi_survives_a_multiframe_grayscale_instance_either() -> None:
    dataset, planted = _ingested(frames=5, rgb=False)
    assert phi_left_in(to_bytes(_deid(dataset)), planted) == []


def test_extract_phi_returns_every_planted_value() -> None:
    dataset, planted = _ingested()
    record = extract_phi(dataset)
    values = record.values()
    missing = [value for value in planted if not any(value in found for found in values)]
    assert missing == []


def test_extract_phi_fills_the_named_fields_and_the_patient_key() -> None:
    dataset, _ = _ingested()
    record = extract_phi(dataset)
    assert record.patient_name == PATIENT_NAME
    assert record.patient_id == PATIENT_ID
    assert record.issuer_of_patient_id == ISSUER
    assert record.birth_date == BIRTH_DATE
    assert record.institution_name == INSTITUTION
    assert record.key.patient_id == PATIENT_ID
    assert record.key.issuer_of_patient_id == ISSUER
    assert any(path.startswith("(0009,") for path, _ in record.other)  # private values too
    assert any("[0]" in path for path, _ in record.other)  # and values nested in sequences


def test_patient_name_and_id_become_the_callers_pseudonym() -> None:
    dataset, _ = _ingested()
    output = _deid(dataset)
    assert output.PatientName == PSEUDONYM
    assert output.PatientID == PSEUDONYM
    assert "IssuerOfPatientID" not in output


@pytest.mark.parametrize("pseudonym", ["", "a\\b", "x" * 65, "Zelphine\x00"])
def test_a_pseudonym_that_is_not_a_valid_lo_value_is_refused(pseudonym: str) -> None:
    dataset, _ = _ingested(plant_phi=False)
    with pytest.raises(ValueError, match="pseudonym"):
        deidentify(dataset, options=DeidOptions(), institution_secret=SECRET, pseudonym=pseudonym)


def test_a_short_institution_secret_is_refused() -> None:
    dataset, _ = _ingested(plant_phi=False)
    with pytest.raises(ValueError, match="secret"):
        deidentify(dataset, options=DeidOptions(), institution_secret=b"short", pseudonym=PSEUDONYM)


def test_every_planted_table_attribute_gets_its_basic_profile_action() -> None:
    dataset, _ = _ingested()
    output = _deid(dataset)
    checked = 0
    for tag in dataset.keys():  # noqa: SIM118 — Dataset iterates elements, not tags
        attribute = profile_attribute(int(tag))
        if attribute is None or tag.is_private or tag in (Tag(0x0010, 0x0010), Tag(0x0010, 0x0020)):
            continue
        action = resolve_action(attribute, DeidOptions())
        element = dataset[tag]
        checked += 1
        if action is Action.REMOVE:
            assert tag not in output, attribute.name
        elif action is Action.EMPTY:
            assert output[tag].is_empty, attribute.name
        elif action is Action.DUMMY:
            assert output[tag].value != element.value, attribute.name
            if element.VR == "SQ":
                assert len(output[tag].value) == 1
                assert len(output[tag].value[0]) == 0
        elif action is Action.REMAP_UID:
            assert str(output[tag].value).startswith("2.25."), attribute.name
        elif action is Action.PROFILE_ITEMS:
            assert output[tag].VR == "SQ"
    assert checked > 400


def test_compound_codes_resolve_to_the_conformant_variant_without_information() -> None:
    def basic(tag: str) -> Action:
        return resolve_action(next(a for a in ATTRIBUTES if a.tag == tag), DeidOptions())

    assert basic("(0008,0050)") is Action.EMPTY  # Z: Accession Number
    assert basic("(0018,4000)") is Action.REMOVE  # X: Acquisition Comments
    assert basic("(0018,11BB)") is Action.DUMMY  # D: Acquisition Field Of View Label
    assert basic("(0010,0020)") is Action.DUMMY  # Z/D: Patient ID
    assert basic("(0008,0022)") is Action.EMPTY  # X/Z: Acquisition Date
    assert basic("(0018,1030)") is Action.DUMMY  # X/D: Protocol Name
    assert basic("(0008,0080)") is Action.DUMMY  # X/Z/D: Institution Name
    assert basic("(0008,1140)") is Action.PROFILE_ITEMS  # X/Z/U*: Referenced Image Sequence
    assert basic("(0020,000D)") is Action.REMAP_UID  # U: Study Instance UID


def test_dummy_values_are_valid_for_their_vr_and_identify_nothing() -> None:
    dataset, _ = _ingested()
    output = _deid(dataset)
    assert output.AcquisitionFieldOfViewLabel == "ANONYMIZED"  # D on LO
    assert output.InstitutionName == "ANONYMIZED"  # X/Z/D on LO
    assert output.AcquisitionDateTime == "19000101000000"  # X/Z/D on DT
    validate(to_bytes(output), max_size=MAX)  # the strict reader accepts every replacement


def test_attributes_outside_the_table_are_kept_and_pixel_data_is_shared_not_copied() -> None:
    dataset, _ = _ingested()
    output = _deid(dataset)
    for keyword in ("Modality", "Manufacturer", "ManufacturerModelName", "Rows", "Columns", "SOPClassUID"):
        assert output[keyword].value == dataset[keyword].value
    assert output.PixelData is dataset.PixelData
    assert output.file_meta.TransferSyntaxUID == dataset.file_meta.TransferSyntaxUID


def test_the_input_data_set_is_left_unchanged() -> None:
    dataset, _ = _ingested()
    before = to_bytes(dataset)
    output = _deid(dataset)
    output.PixelData = b"\x00" * len(output.PixelData)
    output.AnatomicRegionSequence[0].CodeMeaning = "changed"
    assert to_bytes(dataset) == before


def test_sequences_not_in_the_table_are_kept_with_the_profile_applied_inside() -> None:
    dataset, _ = _ingested()
    output = _deid(dataset)
    item = output.AnatomicRegionSequence[0]
    assert item.CodeValue == "T-D4000"
    assert item.CodeMeaning == "Abdomen"
    assert item.ReferringPhysicianName == ""  # Z inside the item as at the top level
    assert item.PatientBirthDate == ""


def test_private_attributes_are_removed_unless_allow_listed() -> None:
    dataset, _ = _ingested()
    assert "SAFE-DEVICE-SETTING-42" not in to_bytes(_deid(dataset)).decode("latin-1")
    allowed = DeidOptions(private_allow_list=frozenset({PrivateTag(0x0009, PRIVATE_CREATOR, 0x02)}))
    output = _deid(dataset, allowed)
    block = output.private_block(0x0009, PRIVATE_CREATOR)
    assert block[0x02].value == "SAFE-DEVICE-SETTING-42"
    assert block.get_tag(0x01) not in output
    assert block.get_tag(0x03) not in output
    assert [tag for tag in output.keys() if tag.is_private] == [Tag(0x0009, 0x0010), block.get_tag(0x02)]  # noqa: SIM118


def test_uids_are_remapped_consistently_within_a_study_and_differently_across_institutions() -> None:
    first, _ = _ingested(sop_uid="1.2.826.0.1.3680043.10.1444.1.1.1.1")
    second_raw, _ = make_instance(
        sop_uid="1.2.826.0.1.3680043.10.1444.1.1.2.1", series_uid="1.2.826.0.1.3680043.10.1444.1.1.2"
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = first.SOPClassUID
    reference.ReferencedSOPInstanceUID = first.SOPInstanceUID
    second_raw.ReferencedImageSequence = Sequence([reference])
    second = validate(to_bytes(second_raw), max_size=MAX).dataset

    a, b = _deid(first), _deid(second)
    assert a.StudyInstanceUID == b.StudyInstanceUID != first.StudyInstanceUID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID
    # X/Z/U*: the reference still points at the (remapped) first instance; the class is kept.
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPClassUID == first.SOPClassUID
    assert _deid(first).StudyInstanceUID == a.StudyInstanceUID  # deterministic
    elsewhere = _deid(first, secret=OTHER_SECRET)
    assert elsewhere.StudyInstanceUID != a.StudyInstanceUID
    assert elsewhere.SOPInstanceUID != a.SOPInstanceUID


def test_remapped_uids_are_uuid_derived_per_ps3_5_b2() -> None:
    new = remap_uid("1.2.826.0.1.3680043.10.1444.1", SECRET)
    assert new.startswith("2.25.")
    assert len(new) <= 64
    value = int(new.removeprefix("2.25."))
    assert (value >> 76) & 0xF == 8  # UUID version 8
    assert (value >> 62) & 0x3 == 0b10  # RFC 9562 variant
    assert remap_uid("1.2.840.10008.5.1.4.1.1.6.1", SECRET) == "1.2.840.10008.5.1.4.1.1.6.1"


@pytest.mark.parametrize(
    ("options", "codes"),
    [
        (DeidOptions(), ["113100"]),
        (DeidOptions(retain_modified_dates=True), ["113100", "113107"]),
        (DeidOptions(retain_device_identity=True), ["113100", "113109"]),
        (DeidOptions(retain_patient_characteristics=True), ["113100", "113108"]),
        (DeidOptions(clean_descriptors=True), ["113100", "113105"]),
        (
            DeidOptions(
                retain_modified_dates=True,
                retain_device_identity=True,
                retain_patient_characteristics=True,
                clean_descriptors=True,
            ),
            ["113100", "113105", "113107", "113108", "113109"],
        ),
    ],
)
def test_cid_7050_codes_and_identity_removed_flag_match_the_options_applied(
    options: DeidOptions, codes: list[str]
) -> None:
    dataset, _ = _ingested(plant_phi=False)
    output = _deid(dataset, options)
    assert output.PatientIdentityRemoved == "YES"
    sequence = output.DeidentificationMethodCodeSequence
    assert [item.CodeValue for item in sequence] == codes
    assert {item.CodingSchemeDesignator for item in sequence} == {"DCM"}
    assert [item.CodeMeaning for item in sequence] == [code.meaning for code in applied_codes(options)]
    method = output.DeidentificationMethod
    assert ([method] if isinstance(method, str) else list(method)) == [
        item.CodeMeaning[:64] for item in sequence
    ]
    expected = "MODIFIED" if options.retain_modified_dates else "REMOVED"
    assert output.LongitudinalTemporalInformationModified == expected


def _leaves(dataset: Dataset, prefix: tuple[BaseTag, ...] = ()) -> dict[tuple[BaseTag, ...], object]:
    """Every element by its path of tags; a sequence counts as its number of items."""
    leaves: dict[tuple[BaseTag, ...], object] = {}
    for tag in dataset.keys():  # noqa: SIM118 — Dataset iterates elements, not tags
        element = dataset[tag]
        path = (*prefix, tag)
        if element.VR == "SQ":
            leaves[path] = len(element.value)
            for index, item in enumerate(element.value):
                leaves.update(_leaves(item, (*path, Tag(index))))  # the item number sits in the path
        else:
            leaves[path] = element.value
    return leaves


OPTIONS = {
    "retain_modified_dates": DeidOptions(retain_modified_dates=True),
    "retain_device_identity": DeidOptions(retain_device_identity=True),
    "retain_patient_characteristics": DeidOptions(retain_patient_characteristics=True),
    "clean_descriptors": DeidOptions(clean_descriptors=True),
}
OPTION_COLUMNS = {
    "retain_modified_dates": "retain_long_modified_dates",
    "retain_device_identity": "retain_device_identity",
    "retain_patient_characteristics": "retain_patient_characteristics",
    "clean_descriptors": "clean_descriptors",
}


@pytest.mark.parametrize("option", sorted(OPTION_COLUMNS))
def test_each_option_changes_only_the_attributes_its_table_column_names(option: str) -> None:
    dataset, _ = _ingested()
    plain = _deid(dataset)
    with_option = _deid(dataset, OPTIONS[option])
    before, after = _leaves(plain), _leaves(with_option)
    changed = [
        path
        for path in set(before) | set(after)
        if before.get(path) != after.get(path) and path[0] not in METHOD_TAGS
    ]
    column = OPTION_COLUMNS[option]
    named = {
        Tag(int(a.tag[1:5] + a.tag[6:10], 16)) for a in ATTRIBUTES if getattr(a, column) and "X" not in a.tag
    }
    assert changed
    # A change is at an attribute of the option's column, or inside one of its sequences.
    assert [path for path in changed if not named.intersection(path)] == []


def test_modified_dates_shift_every_date_of_a_patient_by_the_same_whole_days() -> None:
    first, _ = _ingested()
    second, _ = _ingested(sop_uid="1.2.826.0.1.3680043.10.1444.1.1.1.2")
    options = DeidOptions(retain_modified_dates=True)
    a, b = _deid(first, options), _deid(second, options)
    offset = timedelta(days=patient_date_offset_days(SECRET, PSEUDONYM))
    assert -3650 <= offset.days <= -1

    def shifted(value: str) -> str:
        return (date(int(value[:4]), int(value[4:6]), int(value[6:8])) + offset).strftime("%Y%m%d")

    assert a.StudyDate == b.StudyDate == shifted(first.StudyDate)
    assert a.AcquisitionDateTime == shifted(first.AcquisitionDateTime) + first.AcquisitionDateTime[8:]
    assert a.StudyTime == first.StudyTime  # whole days: the time of day is kept
    assert a.PatientBirthDate == ""  # not in the option's column: Z as in the basic profile
    other_patient = deidentify(first, options=options, institution_secret=SECRET, pseudonym="pt_other")
    assert other_patient.StudyDate != a.StudyDate or offset.days == patient_date_offset_days(
        SECRET, "pt_other"
    )


def test_retain_patient_characteristics_keeps_sex_age_weight_and_cleans_allergies() -> None:
    dataset, _ = _ingested()
    plain = _deid(dataset)
    kept = _deid(dataset, DeidOptions(retain_patient_characteristics=True))
    assert plain.PatientSex == ""
    assert "PatientAge" not in plain
    assert kept.PatientSex == dataset.PatientSex
    assert kept.PatientAge == dataset.PatientAge
    assert kept.PatientWeight == dataset.PatientWeight
    assert kept.Allergies == ""  # C: kept but its free text blanked


def test_retain_device_identity_keeps_serial_number_and_station_name() -> None:
    dataset, _ = _ingested()
    plain = _deid(dataset)
    kept = _deid(dataset, DeidOptions(retain_device_identity=True))
    assert plain.DeviceSerialNumber == "ANONYMIZED"
    assert kept.DeviceSerialNumber == dataset.DeviceSerialNumber
    assert kept.StationName == dataset.StationName


def test_clean_descriptors_keeps_the_attribute_with_its_free_text_blanked() -> None:
    dataset, _ = _ingested()
    plain = _deid(dataset)
    cleaned = _deid(dataset, DeidOptions(clean_descriptors=True))
    assert "AcquisitionComments" not in plain  # X
    assert cleaned.AcquisitionComments == ""  # C: conservative clean blanks the text
    assert cleaned.ProtocolName == ""
    assert phi_left_in(to_bytes(cleaned), [dataset.AcquisitionComments, dataset.ProtocolName]) == []
