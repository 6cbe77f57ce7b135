"""Re-identification: the PHI store's values put back into a de-identified instance.

Only for principals allowed to read PHI (WADO-RS for ``phi:read``, export to the
institution's own PACS). The inverse of ``deid.deidentify`` as far as ``phi.extract_phi``
recorded what it changed:

* the named values (PatientName, PatientID, AccessionNumber …) at the top level; PatientName
  and PatientID always, since the de-identified ones are the pseudonym;
* every other text value the profile removed, emptied or replaced, by its path
  (``(0040,0275)[0](0032,1060)``): sequences and items the profile removed are created
  again, private elements included (their VR is unknown without the creator's dictionary:
  LO, or UT when longer than LO allows);
* UIDs by a map from the stored (remapped) UIDs to the original ones: the study, series and
  SOP Instance UIDs of the instance, and any others the caller knows (say, the rest of the
  study, so references between instances resolve).

Not restored, because ``extract_phi`` does not keep them: binary values the profile removed
(e.g. curve data), UIDs outside the map (they stay the institution's stable remapped UIDs),
and values inside sequences the profile removed that were not text. The result says so:
Patient Identity Removed becomes NO and the de-identification method attributes go.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Final

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from phivault.dicom.deid import (
    DEIDENTIFICATION_METHOD,
    DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
    LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
    PATIENT_IDENTITY_REMOVED,
)
from phivault.dicom.phi import PHI_FIELD_TAGS, PhiRecord

_STEP: Final = re.compile(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)(?:\[(\d{1,6})\])?")
_SINGLE_VALUED: Final = frozenset({"LT", "ST", "UT", "UR"})  # may hold a backslash (PS3.5 §6.2)
_LO_MAX: Final = 64
_FILE_META_GROUP: Final = 0x0002
_ALWAYS: Final = frozenset({"patient_name", "patient_id"})


class PhiPathError(ValueError):
    """A recorded path does not name an element (the document is not one ``extract_phi`` made)."""


def reidentify(dataset: Dataset, phi: PhiRecord, uids: Mapping[str, str]) -> Dataset:
    """A copy of the de-identified ``dataset`` with ``phi`` put back and UIDs mapped by
    ``uids`` (stored UID → original UID). ``dataset`` is not modified; large values such as
    pixel data are shared with it, not copied.
    """
    result = _copy(dataset)
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        result.file_meta = FileMetaDataset(_copy(meta))
    _map_uids(result, uids)
    if meta is not None:
        _map_uids(result.file_meta, uids)
    for field, tag in PHI_FIELD_TAGS.items():
        value: str = getattr(phi, field)
        if value or field in _ALWAYS:
            _set(result, Tag(tag), value)
    for path, value in phi.other:
        steps = _parse(path)
        if steps[0][0] >> 16 == _FILE_META_GROUP:
            if meta is not None and len(steps) == 1:
                _set(result.file_meta, Tag(steps[0][0]), value)
            continue
        _put(result, steps, value)
    result[PATIENT_IDENTITY_REMOVED] = DataElement(PATIENT_IDENTITY_REMOVED, "CS", "NO")
    for tag in (
        DEIDENTIFICATION_METHOD,
        DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
        LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
    ):
        if tag in result:
            del result[tag]
    return result


def _copy(dataset: Dataset) -> Dataset:
    copied = Dataset()
    for element in dataset:
        if element.VR == "SQ":
            copied.add(DataElement(element.tag, "SQ", Sequence([_copy(item) for item in element.value])))
        else:
            copied.add(copy.copy(element))
    return copied


def _map_uids(dataset: Dataset, uids: Mapping[str, str]) -> None:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                _map_uids(item, uids)
        elif element.VR == "UI" and element.value:
            if isinstance(element.value, MultiValue | list):
                element.value = [uids.get(str(uid), str(uid)) for uid in element.value]
            else:
                element.value = uids.get(str(element.value), str(element.value))


def _parse(path: str) -> list[tuple[int, int | None]]:
    steps: list[tuple[int, int | None]] = []
    position = 0
    while position < len(path):
        match = _STEP.match(path, position)
        if match is None:
            raise PhiPathError(path)
        index = match[3]
        steps.append((int(match[1] + match[2], 16), int(index) if index is not None else None))
        position = match.end()
    if not steps or steps[-1][1] is not None or any(index is None for _, index in steps[:-1]):
        raise PhiPathError(path)
    return steps


def _put(dataset: Dataset, steps: list[tuple[int, int | None]], value: str) -> None:
    current = dataset
    for tag, index in steps[:-1]:
        assert index is not None  # noqa: S101  # nosec B101  # _parse checked every step
        element = current.get(Tag(tag))
        if element is None or element.VR != "SQ":
            element = DataElement(Tag(tag), "SQ", Sequence())
            current[Tag(tag)] = element
        while len(element.value) <= index:
            element.value.append(Dataset())
        current = element.value[index]
    _set(current, Tag(steps[-1][0]), value)


def _vr_for(dataset: Dataset, tag: int, value: str) -> str:
    existing = dataset.get(Tag(tag))
    if existing is not None and existing.VR != "SQ":
        return str(existing.VR)
    if not Tag(tag).is_private:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = ""
        if vr and vr != "SQ":
            return vr.split(" or ")[0]
    return "LO" if len(value) <= _LO_MAX and "\\" not in value else "UT"


def _set(dataset: Dataset, tag: int, value: str) -> None:
    vr = _vr_for(dataset, tag, value)
    typed: str | list[str] = value
    if vr not in _SINGLE_VALUED and "\\" in value:
        typed = value.split("\\")
    dataset[Tag(tag)] = DataElement(Tag(tag), vr, typed)
