"""Why an instance is refused at ingest, in the words of the two DICOM protocols that carry it.

One rejection maps to the C-STORE response status (DIMSE, PS3.4 §B.2.3 Table B.2-1, with the
general statuses of PS3.7 Annex C) and to the STOW-RS Failure Reason (0008,1197) of the
Store Instances Response (PS3.18 §10.5.3, Failure Reason values; Table I.2-1 in editions
before 2019). Messages name the rule broken, never a value read from the instance: an
instance's values may be PHI.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class DimseStatus(IntEnum):
    """C-STORE failure statuses (PS3.4 §B.2.3 Table B.2-1; PS3.7 Annex C)."""

    REFUSED_OUT_OF_RESOURCES = 0xA700
    ERROR_DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    ERROR_CANNOT_UNDERSTAND = 0xC000
    REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 §C.5.x general status
    PROCESSING_FAILURE = 0x0110  # PS3.7 §C.4.x general status


class StowFailureReason(IntEnum):
    """Failure Reason (0008,1197) values of a STOW-RS Store Instances Response (PS3.18 §10.5.3)."""

    PROCESSING_FAILURE = 0x0110
    REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


class RejectionCode(StrEnum):
    """Stable problem codes of refused instances (the ``code`` of the HTTP problem)."""

    NOT_DICOM = "dicom_not_dicom"
    TRUNCATED = "dicom_truncated"
    INVALID_VALUE = "dicom_invalid_value"
    MISSING_UID = "dicom_missing_uid"
    UNSUPPORTED_SOP_CLASS = "dicom_unsupported_sop_class"
    UNSUPPORTED_TRANSFER_SYNTAX = "dicom_unsupported_transfer_syntax"
    TOO_LARGE = "dicom_too_large"
    # The study is already stored for another patient of the institution (PS3.3 C.7.2.1:
    # a study belongs to one patient): refused rather than mixing two patients' data.
    STUDY_PATIENT_CONFLICT = "dicom_study_patient_conflict"


@dataclass(frozen=True, slots=True)
class _Mapping:
    dimse: DimseStatus
    stow: StowFailureReason


# The one place a rejection is translated into both protocols.
STATUS_OF: dict[RejectionCode, _Mapping] = {
    # "Cannot understand": the bytes are not a DICOM data set we can parse (PS3.4 Table B.2-1).
    RejectionCode.NOT_DICOM: _Mapping(
        DimseStatus.ERROR_CANNOT_UNDERSTAND, StowFailureReason.CANNOT_UNDERSTAND
    ),
    RejectionCode.TRUNCATED: _Mapping(
        DimseStatus.ERROR_CANNOT_UNDERSTAND, StowFailureReason.CANNOT_UNDERSTAND
    ),
    RejectionCode.INVALID_VALUE: _Mapping(
        DimseStatus.ERROR_CANNOT_UNDERSTAND, StowFailureReason.CANNOT_UNDERSTAND
    ),
    # A Type 1 UID of the SOP Common / General Study / General Series modules is missing or
    # malformed: the data set does not match its SOP Class (PS3.4 Table B.2-1, A900).
    RejectionCode.MISSING_UID: _Mapping(
        DimseStatus.ERROR_DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        StowFailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    ),
    RejectionCode.UNSUPPORTED_SOP_CLASS: _Mapping(
        DimseStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED, StowFailureReason.REFERENCED_SOP_CLASS_NOT_SUPPORTED
    ),
    # DIMSE negotiates the transfer syntax per presentation context, so a C-STORE never
    # carries one we refused; should it happen, it is data we cannot understand.
    RejectionCode.UNSUPPORTED_TRANSFER_SYNTAX: _Mapping(
        DimseStatus.ERROR_CANNOT_UNDERSTAND, StowFailureReason.REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED
    ),
    RejectionCode.TOO_LARGE: _Mapping(
        DimseStatus.REFUSED_OUT_OF_RESOURCES, StowFailureReason.OUT_OF_RESOURCES
    ),
    RejectionCode.STUDY_PATIENT_CONFLICT: _Mapping(
        DimseStatus.PROCESSING_FAILURE, StowFailureReason.PROCESSING_FAILURE
    ),
}


class DicomRejected(Exception):
    """An instance refused at ingest; it must not be stored.

    ``reason`` names the rule that failed and never contains a value of the instance.
    """

    def __init__(self, code: RejectionCode, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.dimse_status = STATUS_OF[code].dimse
        self.stow_failure_reason = STATUS_OF[code].stow

    def __reduce__(self) -> tuple[type[DicomRejected], tuple[RejectionCode, str]]:
        return (DicomRejected, (self.code, self.reason))


class DicomNodeError(Exception):
    """A DICOM node change that cannot be carried out: the problem ``status`` and ``code``."""

    status: int = 400
    code: str = "bad_request"
    message: str = "the request cannot be carried out"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.message)
        self.detail = detail or self.message


class DicomNodeNotFound(DicomNodeError):
    # Also the answer for another institution's node: its existence is not revealed.
    status, code, message = 404, "not_found", "no such DICOM node"


class AeTitleTaken(DicomNodeError):
    # AE titles are unique across the deployment: the SCP maps a calling AE title to one node.
    status, code, message = 409, "ae_title_taken", "another DICOM node has this AE title"


class InvalidAeTitle(DicomNodeError):
    status, code = 400, "invalid_ae_title"


class InvalidDicomNode(DicomNodeError):
    status, code = 400, "invalid_dicom_node"


class DicomNodeForbidden(DicomNodeError):
    status, code, message = 403, "forbidden", "your role does not allow this"
