"""DICOM JSON (PS3.18 Annex F) for answers built from index rows, without pydicom datasets.

QIDO-RS answers a page of flat attributes; building pydicom ``Dataset`` objects only to
serialise them cost more than the database work. ``DicomJsonObject`` holds attributes by
tag with their VR from the data dictionary and writes the Annex F form: person names as
``{"Alphabetic": …}`` (F.2.2), IS/DS/US numbers as JSON numbers, empty values without
``Value`` (F.2.5).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Final

from pydicom.datadict import dictionary_VR, tag_for_keyword

JsonScalar = str | int | float | dict[str, str]
JsonAttribute = dict[str, str | list[JsonScalar]]
_NUMBERS: Final = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"})
_PN_GROUPS: Final = ("Alphabetic", "Ideographic", "Phonetic")


@functools.cache
def tag_of(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return int(tag)


@functools.cache
def vr_of(tag: int) -> str:
    return dictionary_VR(tag).split(" or ")[0]


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


class DicomJsonObject:
    """One data set of a QIDO-RS answer: attributes by tag, written as PS3.18 Annex F."""

    __slots__ = ("_attributes",)

    def __init__(self) -> None:
        self._attributes: dict[int, Sequence[str | int]] = {}

    def set(self, keyword: str, value: str | int | Sequence[str] | None) -> None:
        """Set an attribute; None or "" is an empty (present, zero-length) value."""
        if value is None or value == "":
            values: Sequence[str | int] = ()
        elif isinstance(value, str | int):
            values = (value,)
        else:
            values = tuple(value)
        self._attributes[tag_of(keyword)] = values

    def tags(self) -> list[int]:
        return list(self._attributes)

    def keep(self, tags: Iterable[int]) -> None:
        wanted = set(tags)
        for tag in [tag for tag in self._attributes if tag not in wanted]:
            del self._attributes[tag]

    def value(self, keyword: str) -> str | int | None:
        values = self._attributes.get(tag_of(keyword), ())
        return values[0] if values else None

    def to_json(self) -> dict[str, JsonAttribute]:
        document: dict[str, JsonAttribute] = {}
        for tag in sorted(self._attributes):
            vr = vr_of(tag)
            attribute: JsonAttribute = {"vr": vr}
            values = self._attributes[tag]
            if values:
                attribute["Value"] = [self._json_value(vr, value) for value in values]
            document[f"{tag:08X}"] = attribute
        return document

    @staticmethod
    def _json_value(vr: str, value: str | int) -> JsonScalar:
        if vr == "PN":
            groups = str(value).split("=")
            return {name: group for name, group in zip(_PN_GROUPS, groups, strict=False) if group}
        if vr in _NUMBERS:
            return value if isinstance(value, int) else _number(value)
        return str(value)
