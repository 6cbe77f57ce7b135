"""Keyed pseudonymous UIDs and date offsets, derived from a per-institution secret.

A UID is replaced by ``2.25.<n>`` where ``n`` is a UUID built from HMAC-SHA256(secret, uid)
(PS3.5 §B.2 "UUID Derived UID"; the UUID carries version 8, RFC 9562 §5.8, the version for
custom derivations). The same input UID gives the same output within one institution, so
study, series and references stay linked; another institution's secret gives unrelated UIDs,
and without the secret the mapping can neither be reversed nor tested.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

# UIDs under the DICOM root name SOP classes, transfer syntaxes and coding schemes: they
# identify no one and must keep their meaning (PS3.6 Annex A).
STANDARD_UID_ROOT: Final = "1.2.840.10008."
MAX_DATE_OFFSET_DAYS: Final = 3650
_UID_LABEL: Final = b"phivault/dicom/uid\x00"
_DATE_LABEL: Final = b"phivault/dicom/date-offset\x00"
_MIN_SECRET_BYTES: Final = 16


def _check_secret(secret: bytes) -> None:
    if len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(f"the institution secret must be at least {_MIN_SECRET_BYTES} bytes")


def remap_uid(uid: str, secret: bytes) -> str:
    """The institution's pseudonymous UID for ``uid`` (standard UIDs are returned unchanged)."""
    _check_secret(secret)
    if uid.startswith(STANDARD_UID_ROOT):
        return uid
    digest = hmac.new(secret, _UID_LABEL + uid.encode("ascii", "surrogateescape"), hashlib.sha256).digest()
    n = int.from_bytes(digest[:16], "big")
    # RFC 9562 §4.1/§4.2: variant bits 10, version 8.
    n &= ~(0xC000 << 48)
    n |= 0x8000 << 48
    n &= ~(0xF000 << 64)
    n |= 8 << 76
    return f"2.25.{n}"


def patient_date_offset_days(secret: bytes, pseudonym: str) -> int:
    """Days (-3650 to -1) added to every date of one patient (Modified Dates option, PS3.15 E.3.6).

    Derived from the caller's pseudonym, never from PHI, so every instance of a patient moves
    by the same amount and intervals between them are kept.
    """
    _check_secret(secret)
    digest = hmac.new(secret, _DATE_LABEL + pseudonym.encode("utf-8"), hashlib.sha256).digest()
    return -(int.from_bytes(digest[:8], "big") % MAX_DATE_OFFSET_DAYS + 1)
