"""The egress guard: the last check on bytes leaving through a share link.

De-identification happens at ingest; this guard does not trust it. Every byte a share
sends (the page, JSON, DICOM, rendered images) is searched for the patient's PHI values,
taken from the PHI store and decrypted server-side for this purpose only. A hit blocks the
response and raises a security alert (the caller logs it without values and records an
``egress.block`` audit event naming the share and the patient by pseudonym).

**Which values** (``guard_values``), for the patient and every instance sent:

* identifiers: the patient's name, PatientID, issuer, birth date, other IDs and names,
  address, telephone numbers, accession number; the names of physicians and operators;
  the institution's name, address and department; the original Study, Series and SOP
  Instance UIDs (the shared ones are remapped);
* each component of every person name (``Family^Given^Middle``): a family name alone in a
  description is found too;
* the other person names and dates the de-identification removed (``PhiRecord.other``
  of VR PN, DA, DT), unless the institution's options keep or shift that attribute.

Free text the profile removed (descriptions, comments) is not matched whole: the same words
legitimately recur in kept attributes ("ABDOMEN" in a removed Study Description and a kept
Body Part Examined); a name or identifier inside free text is still found. Private values
are not matched whole either (their VR is unknown); names inside them are.

**Too short to mean anything**: values under ``MIN_VALUE_LENGTH`` (6) characters, and
values of digits and punctuation only under ``MIN_NUMERIC_LENGTH`` (8) — a sex, an age, a
time — are ignored: they occur by chance in pixel data and in kept attributes. A date
(8 digits) or a PatientID of 6+ characters with a letter is checked. Known dummy values of
the de-identification ("ANONYMIZED", "19000101") are never matched.

**How**: case-insensitive for ASCII letters (upper and lower case of other letters), in
UTF-8, ISO 8859-1 (DICOM's ISO_IR 100), UTF-16 (both byte orders) and as HTML and JSON
escape it. Streaming: ``screen`` checks each chunk before any of its bytes leave, and holds
back the last ``longest value - 1`` bytes until the next chunk is checked, so a value split
across chunks is caught and no part of a value leaves. Matching is one pass per chunk
whatever the number of values: a bitmap of the values' 4-byte prefixes finds candidates
with numpy, and only candidates are compared (hundreds of MB/s on one core).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
from pydicom.datadict import dictionary_VR

from phivault.dicom.deid import Action, DeidOptions, profile_attribute, resolve_action
from phivault.dicom.phi import PhiRecord

MIN_VALUE_LENGTH: Final = 6
MIN_NUMERIC_LENGTH: Final = 8
_PREFIX: Final = 4  # bytes of each value's prefix in the candidate bitmap
_TABLE_BITS: Final = 22
_HASH_MULTIPLIER: Final = np.uint32(2654435761)  # Knuth's multiplicative hash
_NUMERIC: Final = re.compile(r"^[\d\s.,:+\-/\\]*$")
_NAME_SEPARATORS: Final = re.compile(r"[\^=,\s]+")
# The de-identification's own dummies (deid._DUMMY_BY_VR) and the profile's words.
_NEVER: Final = frozenset({"anonymized", "19000101", "19000101000000", "000000"})
# Named PHI fields that no option of ours keeps (Table E.1-1; sex, age and station name
# can be kept by Retain Patient Characteristics / Device Identity and are left out).
IDENTIFYING_FIELDS: Final = (
    "patient_name",
    "patient_id",
    "issuer_of_patient_id",
    "birth_date",
    "address",
    "telephone_numbers",
    "other_patient_ids",
    "other_patient_names",
    "accession_number",
    "referring_physician_name",
    "performing_physician_name",
    "operators_name",
    "physicians_of_record",
    "name_of_physicians_reading_study",
    "institution_name",
    "institution_address",
    "institutional_department_name",
)
_NAME_FIELDS: Final = frozenset(
    {
        "patient_name",
        "other_patient_names",
        "referring_physician_name",
        "performing_physician_name",
        "operators_name",
        "physicians_of_record",
        "name_of_physicians_reading_study",
    }
)
_OTHER_VRS: Final = frozenset({"PN", "DA", "DT"})
_PATH_TAG: Final = re.compile(r"^\(([0-9A-F]{4}),([0-9A-F]{4})\)")
_REMOVED: Final = frozenset({Action.REMOVE, Action.EMPTY, Action.DUMMY, Action.PROFILE_ITEMS})


class EgressBlocked(Exception):
    """PHI of the patient was found in bytes about to leave; nothing of them was sent."""


def meaningful(value: str) -> bool:
    """Whether ``value`` is long enough to be searched for (see the module docstring)."""
    text = value.strip(" \x00")
    if text.casefold() in _NEVER:
        return False
    if _NUMERIC.match(text):
        return len(text) >= MIN_NUMERIC_LENGTH
    return len(text) >= MIN_VALUE_LENGTH


def _with_parts(value: str, *, name: bool) -> list[str]:
    values = [value]
    for single in value.split("\\"):  # DICOM multiple values
        values.append(single)
        if name:
            values.extend(part for part in _NAME_SEPARATORS.split(single) if part)
    return values


def _other_kept(path: str, options: DeidOptions) -> bool:
    """Whether the top-level attribute of ``path`` is one ``options`` keep, clean or shift."""
    match = _PATH_TAG.match(path)
    if match is None:
        return True
    tag = int(match[1] + match[2], 16)
    attribute = profile_attribute(tag)
    if attribute is None:
        return True  # not in the profile: kept as it is (the value is not PHI by the profile)
    return resolve_action(attribute, options) not in _REMOVED


def _other_vr(path: str) -> str | None:
    tags = re.findall(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)", path)
    group, element = tags[-1]
    tag = int(group + element, 16)
    if int(group, 16) % 2 == 1:
        return None  # private: VR unknown
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def record_values(record: PhiRecord, options: DeidOptions) -> list[str]:
    """The values of one instance's PHI record the guard searches for."""
    values: list[str] = []
    for field in IDENTIFYING_FIELDS:
        value = str(getattr(record, field))
        if value:
            values.extend(_with_parts(value, name=field in _NAME_FIELDS))
    for path, value in record.other:
        if _other_vr(path) in _OTHER_VRS and not _other_kept(path, options):
            values.extend(_with_parts(value, name=_other_vr(path) == "PN"))
    return values


def guard_values(values: Iterable[str]) -> list[str]:
    """The distinct meaningful values among ``values``, longest first."""
    kept = {value.strip(" \x00") for value in values if meaningful(value)}
    return sorted(kept, key=lambda value: (-len(value), value))


def _encodings(value: str) -> set[bytes]:
    forms = {value, value.lower(), value.upper(), html.escape(value), json.dumps(value)[1:-1]}
    encoded: set[bytes] = set()
    for form in forms:
        for codec in ("utf-8", "latin-1", "utf-16-le", "utf-16-be"):
            try:
                encoded.add(form.encode(codec).lower())
            except UnicodeEncodeError:
                continue
    return {needle for needle in encoded if len(needle) >= _PREFIX}


@dataclass(frozen=True, slots=True)
class _Needles:
    by_prefix: dict[bytes, tuple[bytes, ...]]
    table: np.ndarray  # bool, 2**_TABLE_BITS: some needle's prefix hashes here
    longest: int


def _hash(words: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (words * _HASH_MULTIPLIER) >> np.uint32(32 - _TABLE_BITS)


class EgressGuard:
    """Searches bytes for a fixed set of PHI values (see the module docstring)."""

    def __init__(self, values: Iterable[str]) -> None:
        needles: set[bytes] = set()
        for value in guard_values(values):
            needles |= _encodings(value)
        by_prefix: dict[bytes, list[bytes]] = {}
        for needle in needles:
            by_prefix.setdefault(needle[:_PREFIX], []).append(needle)
        table = np.zeros(1 << _TABLE_BITS, dtype=np.bool_)
        if by_prefix:
            prefixes = np.frombuffer(b"".join(sorted(by_prefix)), dtype="<u4")
            table[_hash(prefixes)] = True
        self._needles = _Needles(
            {prefix: tuple(found) for prefix, found in by_prefix.items()},
            table,
            max((len(needle) for needle in needles), default=0),
        )

    @property
    def empty(self) -> bool:
        return not self._needles.by_prefix

    def finds(self, data: bytes) -> bool:
        """Whether any value occurs in ``data``."""
        needles = self._needles
        if not needles.by_prefix or len(data) < _PREFIX:
            return False
        low = data.lower()
        for offset in range(_PREFIX):
            count = (len(low) - offset) // _PREFIX
            if count <= 0:
                continue
            words = np.frombuffer(low, dtype="<u4", count=count, offset=offset)
            for index in np.flatnonzero(needles.table[_hash(words)]):
                start = offset + int(index) * _PREFIX
                for needle in needles.by_prefix.get(low[start : start + _PREFIX], ()):
                    if low.startswith(needle, start):
                        return True
        return False

    def screen(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """``chunks`` as they are, once checked; ``EgressBlocked`` before any byte of a hit."""
        keep = max(self._needles.longest - 1, 0)
        pending = b""
        for chunk in chunks:
            if not chunk:
                continue
            pending += chunk
            if self.finds(pending):
                raise EgressBlocked
            if len(pending) > keep:
                cut = len(pending) - keep
                yield pending[:cut]
                pending = pending[cut:]
        if pending:
            yield pending
