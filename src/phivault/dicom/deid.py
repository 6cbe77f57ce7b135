"""De-identification per DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.

The actions come from Table E.1-1 (``profile_table``, generated). Four options may be enabled
per institution (PS3.15 E.3): Retain Longitudinal Temporal Information with Modified Dates,
Retain Device Identity, Retain Patient Characteristics and Clean Descriptors.

Choices the standard leaves to the implementation, made here without IOD knowledge:

* compound codes resolve to the variant that keeps the data set conformant and still carries
  no information: Z/D, X/D and X/Z/D → D (dummy); X/Z → Z (empty); X/Z/U* → the sequence is
  kept and the profile applied inside it, so contained instance UIDs are remapped (U);
* C (clean) of a text value blanks it (zero length): a conservative clean that removes all the
  text, not only the identifying words; C of a sequence applies the profile to its items;
* with Modified Dates, dates move by a whole number of days per patient, so times (TM) are
  kept and date/time (DT) values keep their time of day;
* when two enabled options disagree on an attribute, the more protective wins:
  clean, then shift dates, then keep.

The input data set is not modified. Pixel data is shared with the input, never copied.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from enum import Enum
from typing import Final

from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from phivault.dicom.profile_table import ATTRIBUTES, ProfileAttribute
from phivault.dicom.uids import patient_date_offset_days, remap_uid


class Action(Enum):
    """What happens to one element (PS3.15 Table E.1-1 action codes, compounds resolved)."""

    KEEP = "K"
    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    REMAP_UID = "U"
    CLEAN = "C"
    SHIFT_DATE = "C (modified dates)"
    PROFILE_ITEMS = "X/Z/U*"


@dataclass(frozen=True, slots=True)
class PrivateTag:
    """One private attribute: its group, its Private Creator and its element within the block."""

    group: int
    creator: str
    element: int  # 0x00-0xFF, the low byte of the element number (PS3.5 §7.8.1)


@dataclass(frozen=True, slots=True)
class DeidOptions:
    """The PS3.15 Annex E options an institution enables, and its private tag allow-list."""

    retain_modified_dates: bool = False
    retain_device_identity: bool = False
    retain_patient_characteristics: bool = False
    clean_descriptors: bool = False
    private_allow_list: frozenset[PrivateTag] = frozenset()


@dataclass(frozen=True, slots=True)
class DeidCode:
    value: str
    meaning: str


# PS3.16 CID 7050 "De-identification Method", coding scheme DCM.
BASIC_PROFILE_CODE: Final = DeidCode("113100", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_DATA_CODE: Final = DeidCode("113101", "Clean Pixel Data Option")
CLEAN_DESCRIPTORS_CODE: Final = DeidCode("113105", "Clean Descriptors Option")
MODIFIED_DATES_CODE: Final = DeidCode(
    "113107", "Retain Longitudinal Temporal Information Modified Dates Option"
)
PATIENT_CHARACTERISTICS_CODE: Final = DeidCode("113108", "Retain Patient Characteristics Option")
DEVICE_IDENTITY_CODE: Final = DeidCode("113109", "Retain Device Identity Option")

_DUMMY_TEXT: Final = "ANONYMIZED"
# Dummy values per VR (PS3.5 §6.2): valid, and identifying nothing.
_DUMMY_BY_VR: Final[dict[str, object]] = {
    "AE": "ANONYMIZED",
    "AS": "000D",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "LO": _DUMMY_TEXT,
    "LT": _DUMMY_TEXT,
    "PN": _DUMMY_TEXT,
    "SH": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT,
    "UC": _DUMMY_TEXT,
    "UT": _DUMMY_TEXT,
    "UR": "",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
}
_TEXT_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM"}
) | {
    "UC",
    "UR",
    "UT",
}
_DATE_VRS: Final = frozenset({"DA", "DT", "TM"})
_PSEUDONYM: Final = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,62}[\x21-\x5b\x5d-\x7e])?$")

PATIENT_NAME: Final = Tag(0x0010, 0x0010)
PATIENT_ID: Final = Tag(0x0010, 0x0020)
PATIENT_IDENTITY_REMOVED: Final = Tag(0x0012, 0x0062)
DEIDENTIFICATION_METHOD: Final = Tag(0x0012, 0x0063)
DEIDENTIFICATION_METHOD_CODE_SEQUENCE: Final = Tag(0x0012, 0x0064)
LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED: Final = Tag(0x0028, 0x0303)
# File Meta Information (PS3.10 §7.1) kept; the AE titles of group 0002 name sites and devices.
_FILE_META_KEPT: Final = (
    "FileMetaInformationVersion",
    "MediaStorageSOPClassUID",
    "TransferSyntaxUID",
    "ImplementationClassUID",
    "ImplementationVersionName",
)


def _tag_value(text: str) -> int:
    return int(text[1:5] + text[6:10], 16)


_EXACT: Final[dict[int, ProfileAttribute]] = {
    _tag_value(a.tag): a for a in ATTRIBUTES if "X" not in a.tag and not a.tag.startswith("(GGGG")
}
_CURVE_DATA: Final = next(a for a in ATTRIBUTES if a.tag == "(50XX,XXXX)")
_OVERLAY: Final[dict[int, ProfileAttribute]] = {
    _tag_value(a.tag.replace("XX", "00", 1)) & 0xFFFF: a for a in ATTRIBUTES if a.tag.startswith("(60XX")
}


# Repeating groups: even groups 5000-50FE (curves) and 6000-60FE (overlays), PS3.5 §7.6.
_REPEATING_MASK: Final = 0xFF01
_CURVE_GROUP: Final = 0x5000
_OVERLAY_GROUP: Final = 0x6000


def profile_attribute(tag: int) -> ProfileAttribute | None:
    """The Table E.1-1 row for a standard tag, including the curve and overlay groups."""
    found = _EXACT.get(tag)
    if found is not None:
        return found
    group, element = tag >> 16, tag & 0xFFFF
    if group & _REPEATING_MASK == _CURVE_GROUP:
        return _CURVE_DATA
    if group & _REPEATING_MASK == _OVERLAY_GROUP:
        return _OVERLAY.get(element)
    return None


_COMPOUND: Final[dict[str, Action]] = {
    "K": Action.KEEP,
    "X": Action.REMOVE,
    "Z": Action.EMPTY,
    "D": Action.DUMMY,
    "U": Action.REMAP_UID,
    "C": Action.CLEAN,
    "Z/D": Action.DUMMY,
    "X/Z": Action.EMPTY,
    "X/D": Action.DUMMY,
    "X/Z/D": Action.DUMMY,
    "X/Z/U*": Action.PROFILE_ITEMS,
}


def resolve_action(attribute: ProfileAttribute, options: DeidOptions) -> Action:
    """The action for ``attribute`` under ``options`` (see the module docstring for the order)."""
    enabled: list[Action] = []
    if options.retain_modified_dates and attribute.retain_long_modified_dates == "C":
        enabled.append(Action.SHIFT_DATE)
    for on, code in (
        (options.retain_device_identity, attribute.retain_device_identity),
        (options.retain_patient_characteristics, attribute.retain_patient_characteristics),
        (options.clean_descriptors, attribute.clean_descriptors),
    ):
        if on and code:
            enabled.append(Action.CLEAN if code == "C" else Action.KEEP)
    for preferred in (Action.CLEAN, Action.SHIFT_DATE, Action.KEEP):
        if preferred in enabled:
            return preferred
    return _COMPOUND[attribute.basic]


@functools.lru_cache(maxsize=64)
def _actions(options: DeidOptions) -> dict[int, Action]:
    return {tag: resolve_action(attribute, options) for tag, attribute in _EXACT.items()}


def applied_codes(options: DeidOptions) -> tuple[DeidCode, ...]:
    """The CID 7050 codes that describe what :func:`deidentify` does under ``options``."""
    codes = [BASIC_PROFILE_CODE]
    if options.clean_descriptors:
        codes.append(CLEAN_DESCRIPTORS_CODE)
    if options.retain_modified_dates:
        codes.append(MODIFIED_DATES_CODE)
    if options.retain_patient_characteristics:
        codes.append(PATIENT_CHARACTERISTICS_CODE)
    if options.retain_device_identity:
        codes.append(DEVICE_IDENTITY_CODE)
    return tuple(codes)


@dataclass(frozen=True, slots=True)
class _Run:
    options: DeidOptions
    actions: dict[int, Action]
    secret: bytes
    date_offset: timedelta


def deidentify(
    dataset: Dataset, *, options: DeidOptions, institution_secret: bytes, pseudonym: str
) -> Dataset:
    """A de-identified copy of ``dataset``; PatientName and PatientID become ``pseudonym``.

    ``pseudonym`` is the caller's stable opaque patient id (never derived from PHI); it must
    be 1-64 printable ASCII characters without a backslash (LO, PS3.5 §6.2).
    ``institution_secret`` keys the UID remapping and the per-patient date offset.
    """
    if not _PSEUDONYM.match(pseudonym):
        raise ValueError("the pseudonym must be 1-64 printable ASCII characters without a backslash")
    run = _Run(
        options=options,
        actions=_actions(options),
        secret=institution_secret,
        date_offset=timedelta(days=patient_date_offset_days(institution_secret, pseudonym)),
    )
    result = _deidentify_items(dataset, run)
    if isinstance(dataset, Dataset) and "SOPInstanceUID" in dataset:
        result.file_meta = _file_meta(dataset, result)
    result[PATIENT_NAME] = DataElement(PATIENT_NAME, "PN", pseudonym)
    result[PATIENT_ID] = DataElement(PATIENT_ID, "LO", pseudonym)
    _record_method(result, options)
    return result


def _file_meta(source: Dataset, result: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    original = getattr(source, "file_meta", None)
    for keyword in _FILE_META_KEPT:
        if original is not None and keyword in original:
            meta[keyword] = copy.copy(original[keyword])
    meta.MediaStorageSOPInstanceUID = result.SOPInstanceUID
    if "SOPClassUID" in result:
        meta.MediaStorageSOPClassUID = result.SOPClassUID
    return meta


def _record_method(result: Dataset, options: DeidOptions) -> None:
    # PS3.3 C.12.1.1.7: say that and how the identity was removed.
    codes = applied_codes(options)
    result[PATIENT_IDENTITY_REMOVED] = DataElement(PATIENT_IDENTITY_REMOVED, "CS", "YES")
    # LO is limited to 64 characters per value (PS3.5 §6.2), so one value per code meaning.
    result[DEIDENTIFICATION_METHOD] = DataElement(
        DEIDENTIFICATION_METHOD, "LO", [code.meaning[:64] for code in codes]
    )
    items = []
    for code in codes:
        item = Dataset()
        item.CodeValue = code.value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = code.meaning
        items.append(item)
    result[DEIDENTIFICATION_METHOD_CODE_SEQUENCE] = DataElement(
        DEIDENTIFICATION_METHOD_CODE_SEQUENCE, "SQ", Sequence(items)
    )
    # PS3.3 C.7.1.1: REMOVED unless the Modified Dates option kept shifted dates.
    result[LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED] = DataElement(
        LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
        "CS",
        "MODIFIED" if options.retain_modified_dates else "REMOVED",
    )


def add_method_code(dataset: Dataset, code: DeidCode) -> None:
    """Record one more CID 7050 method (e.g. Clean Pixel Data) on a de-identified data set."""
    if DEIDENTIFICATION_METHOD_CODE_SEQUENCE not in dataset:
        return
    if any(
        item.get("CodeValue") == code.value for item in dataset[DEIDENTIFICATION_METHOD_CODE_SEQUENCE].value
    ):
        return
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = code.meaning
    dataset[DEIDENTIFICATION_METHOD_CODE_SEQUENCE].value.append(item)
    if DEIDENTIFICATION_METHOD in dataset:
        values = list(_as_list(dataset[DEIDENTIFICATION_METHOD].value))
        dataset[DEIDENTIFICATION_METHOD].value = [*values, code.meaning[:64]]


def _as_list(value: object) -> Iterable[object]:
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [] if value in (None, "") else [value]


def _kept_private(dataset: Dataset, allow_list: frozenset[PrivateTag]) -> set[int]:
    """Private element tags on the allow-list, with their Private Creator elements."""
    kept: set[int] = set()
    if not allow_list:
        return kept
    for tag in dataset.keys():  # noqa: SIM118 — Dataset iterates elements, not tags
        if not tag.is_private or tag.element < 0x1000:  # noqa: PLR2004 — data elements start at xx10,00 (PS3.5 §7.8.1)
            continue
        creator_tag = Tag(tag.group, tag.element >> 8)
        creator = dataset.get(creator_tag)
        if creator is None:
            continue
        if PrivateTag(tag.group, str(creator.value), tag.element & 0xFF) in allow_list:
            kept.update((int(tag), int(creator_tag)))
    return kept


def _deidentify_items(source: Dataset, run: _Run) -> Dataset:
    result = Dataset()
    kept_private = _kept_private(source, run.options.private_allow_list)
    for tag in source.keys():  # noqa: SIM118 — Dataset iterates elements, not tags
        if tag.element == 0:
            continue  # group lengths (gggg,0000) are retired and would be wrong afterwards
        if tag.is_private:
            if int(tag) in kept_private:
                element = source[tag]
                result.add(_copy_keep(element, run))
            continue  # private attributes: X unless allow-listed (Table E.1-1 last row)
        element = source[tag]
        action = run.actions.get(int(tag))
        if action is None:
            attribute = profile_attribute(int(tag))
            action = Action.KEEP if attribute is None else resolve_action(attribute, run.options)
        replaced = _apply(element, action, run)
        if replaced is not None:
            result.add(replaced)
    return result


def _copy_keep(element: DataElement, run: _Run) -> DataElement:
    if element.VR == "SQ":
        return DataElement(
            element.tag, "SQ", Sequence([_deidentify_items(item, run) for item in element.value])
        )
    # A shallow copy shares the value (pixel data is not copied) but not the element, so
    # writing the result never changes the input.
    return copy.copy(element)


def _apply(element: DataElement, action: Action, run: _Run) -> DataElement | None:  # noqa: PLR0911
    tag, vr = element.tag, str(element.VR)
    match action:
        case Action.KEEP | Action.PROFILE_ITEMS:
            return _copy_keep(element, run)
        case Action.REMOVE:
            return None
        case Action.EMPTY:
            return _empty(tag, vr)
        case Action.DUMMY:
            return _dummy(element, run)
        case Action.REMAP_UID:
            return _remap(element, run)
        case Action.CLEAN:
            if vr == "SQ":
                return _copy_keep(element, run)
            return _empty(tag, vr)
        case Action.SHIFT_DATE:
            if vr in _DATE_VRS:
                return _shift(element, run.date_offset)
            attribute = profile_attribute(int(tag))
            basic = Action.REMOVE if attribute is None else _COMPOUND[attribute.basic]
            return _apply(element, basic, run)


def _empty(tag: BaseTag, vr: str) -> DataElement:
    if vr == "SQ":
        return DataElement(tag, vr, Sequence())
    return DataElement(tag, vr, empty_value_for_VR(vr))


def _dummy(element: DataElement, run: _Run) -> DataElement:
    vr = str(element.VR)
    if vr == "SQ":
        return DataElement(element.tag, vr, Sequence([Dataset()]))
    if vr == "UI":
        return _remap(element, run)
    if vr in _DUMMY_BY_VR:
        return DataElement(element.tag, vr, _DUMMY_BY_VR[vr])
    return _empty(element.tag, vr)  # binary VRs (OB, OW, UN …): no dummy carries meaning


def _remap(element: DataElement, run: _Run) -> DataElement:
    if element.VR != "UI":
        return _empty(element.tag, str(element.VR))
    values = [remap_uid(str(uid), run.secret) for uid in _as_list(element.value)]
    return DataElement(element.tag, "UI", values[0] if len(values) == 1 else values or None)


def _shift(element: DataElement, offset: timedelta) -> DataElement:
    vr = str(element.VR)
    if vr == "TM":
        return copy.copy(element)  # whole-day offsets leave the time of day unchanged
    shifted = [_shift_one(str(value), offset) for value in _as_list(element.value)]
    if any(value is None for value in shifted):
        return _empty(element.tag, vr)  # a date we cannot read is not kept
    values = [value for value in shifted if value is not None]
    return DataElement(element.tag, vr, values[0] if len(values) == 1 else values or None)


def _shift_one(text: str, offset: timedelta) -> str | None:
    # DA is YYYYMMDD; DT starts with YYYYMMDD when it has day precision (PS3.5 §6.2).
    if len(text) < 8 or not text[:8].isdigit():  # noqa: PLR2004 — the length of YYYYMMDD
        return None
    try:
        day = date(int(text[:4]), int(text[4:6]), int(text[6:8])) + offset
    except (ValueError, OverflowError):
        return None
    return day.strftime("%Y%m%d") + text[8:]


def text_value(element: DataElement) -> str | None:
    """The element's value as text when its VR holds text, else None."""
    if str(element.VR) not in _TEXT_VRS or element.value is None:
        return None
    values = _as_list(element.value)
    text = "\\".join(str(value) for value in values)
    return text or None
