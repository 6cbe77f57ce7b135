"""The pure DICOM layer of exam ingest: validation, PHI split, de-identification, pixel rules.

No database and no HTTP here; the ingest pipeline calls these functions in this order:
:func:`validate` → :func:`extract_phi` → :func:`deidentify` → :func:`apply_pixel_rules`.
"""

from phivault.dicom.deid import DeidCode, DeidOptions, PrivateTag, applied_codes, deidentify
from phivault.dicom.errors import DicomRejected, DimseStatus, RejectionCode, StowFailureReason
from phivault.dicom.phi import PatientKey, PhiRecord, extract_phi, patient_key
from phivault.dicom.pixels import (
    PixelOutcome,
    PixelOutcomeKind,
    PixelRule,
    QuarantineReason,
    Region,
    apply_pixel_rules,
    default_rules,
)
from phivault.dicom.validation import ValidatedInstance, read_for_display, validate

__all__ = [
    "DeidCode",
    "DeidOptions",
    "DicomRejected",
    "DimseStatus",
    "PatientKey",
    "PhiRecord",
    "PixelOutcome",
    "PixelOutcomeKind",
    "PixelRule",
    "PrivateTag",
    "QuarantineReason",
    "Region",
    "RejectionCode",
    "StowFailureReason",
    "ValidatedInstance",
    "applied_codes",
    "apply_pixel_rules",
    "default_rules",
    "deidentify",
    "extract_phi",
    "patient_key",
    "read_for_display",
    "validate",
]
