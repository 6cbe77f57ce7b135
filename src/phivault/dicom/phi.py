"""The PHI of one instance, split off before de-identification and kept in the PHI store."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from pydicom.dataset import Dataset

from phivault.dicom.deid import Action, DeidOptions, profile_attribute, resolve_action, text_value

# Named PHI fields: DICOM keyword → PhiRecord field (PS3.15 Table E.1-1 rows of the patient,
# visit, physicians and institution). Everything else the profile removes goes to ``other``.
_NAMED: Final[dict[int, str]] = {
    0x00100010: "patient_name",
    0x00100020: "patient_id",
    0x00100021: "issuer_of_patient_id",
    0x00100030: "birth_date",
    0x00100040: "sex",
    0x00101010: "age",
    0x00101040: "address",
    0x00102154: "telephone_numbers",
    0x00101000: "other_patient_ids",
    0x00101001: "other_patient_names",
    0x00080050: "accession_number",
    0x00080090: "referring_physician_name",
    0x00081050: "performing_physician_name",
    0x00081070: "operators_name",
    0x00081048: "physicians_of_record",
    0x00081060: "name_of_physicians_reading_study",
    0x00080080: "institution_name",
    0x00080081: "institution_address",
    0x00081040: "institutional_department_name",
    0x00081010: "station_name",
}
PHI_FIELD_TAGS: Final[Mapping[str, int]] = MappingProxyType({field: tag for tag, field in _NAMED.items()})
"""The tag of each named ``PhiRecord`` field (re-identification puts values back by it)."""
_NO_OPTIONS: Final = DeidOptions()
# Source, Sending and Receiving Application Entity Title (PS3.10 §7.1).
_FILE_META_AE_TITLES: Final = (0x00020016, 0x00020017, 0x00020018)


@dataclass(frozen=True, slots=True)
class PatientKey:
    """Which patient an instance belongs to in the PHI store (PS3.3 C.7.1.1)."""

    patient_id: str
    issuer_of_patient_id: str


@dataclass(frozen=True, slots=True)
class PhiRecord:
    """PHI values of one instance, as text (multiple values joined by a backslash)."""

    patient_name: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    birth_date: str = ""
    sex: str = ""
    age: str = ""
    address: str = ""
    telephone_numbers: str = ""
    other_patient_ids: str = ""
    other_patient_names: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""
    performing_physician_name: str = ""
    operators_name: str = ""
    physicians_of_record: str = ""
    name_of_physicians_reading_study: str = ""
    institution_name: str = ""
    institution_address: str = ""
    institutional_department_name: str = ""
    station_name: str = ""
    # Every other text value the Basic Profile removes or replaces, by path: "(gggg,eeee)" at
    # the top level, "(gggg,eeee)[i](gggg,eeee)" inside sequence items; private ones too.
    other: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> PatientKey:
        return PatientKey(self.patient_id, self.issuer_of_patient_id)

    def values(self) -> tuple[str, ...]:
        """Every non-empty PHI value, named and other."""
        named = tuple(getattr(self, field) for field in sorted(set(_NAMED.values())) if getattr(self, field))
        return named + tuple(value for _, value in self.other)


def extract_phi(dataset: Dataset) -> PhiRecord:
    """The PHI of ``dataset``: what the Basic Profile (no options) would not keep, as text."""
    named: dict[str, str] = {}
    other: list[tuple[str, str]] = []
    _collect(dataset, "", named, other, removed=False)
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        # The AE titles of the File Meta Information name the sending site's systems.
        other.extend(
            (f"({tag >> 16:04X},{tag & 0xFFFF:04X})", str(meta[tag].value))
            for tag in _FILE_META_AE_TITLES
            if tag in meta and meta[tag].value
        )
    return PhiRecord(**named, other=tuple(other))


def _collect(
    dataset: Dataset, prefix: str, named: dict[str, str], other: list[tuple[str, str]], *, removed: bool
) -> None:
    # ``removed``: inside a sequence the profile removes or replaces, every value goes.
    for tag in dataset.keys():  # noqa: SIM118 — Dataset iterates elements, not tags
        element = dataset[tag]
        path = f"{prefix}({tag.group:04X},{tag.element:04X})"
        if tag.is_private or removed:
            action = Action.REMOVE
        else:
            attribute = profile_attribute(int(tag))
            action = Action.KEEP if attribute is None else resolve_action(attribute, _NO_OPTIONS)
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                _collect(
                    item,
                    f"{path}[{index}]",
                    named,
                    other,
                    removed=action in (Action.REMOVE, Action.EMPTY, Action.DUMMY),
                )
            continue
        if action in (Action.KEEP, Action.REMAP_UID) or element.VR == "UI":
            continue  # UIDs are remapped, not stored as PHI: they name objects, not people
        text = text_value(element)
        if text is None:
            continue
        field = _NAMED.get(int(tag)) if not prefix else None
        if field is not None:
            named[field] = text
        else:
            other.append((path, text))


def patient_key(dataset: Dataset) -> PatientKey:
    """The PHI-store key of the patient of ``dataset``."""
    return PatientKey(
        str(dataset.get("PatientID", "") or ""), str(dataset.get("IssuerOfPatientID", "") or "")
    )
