"""What callers of the ingest pipeline hand in and get back (agent uploads, STOW-RS, C-STORE)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from phivault.audit.service import Subject


class IngestChannel(StrEnum):
    """How an instance reached phivault; recorded with it and in its audit event."""

    STOW = "stow"  # POST /dicomweb/studies
    DIMSE = "dimse"  # C-STORE to the SCP
    UPLOAD = "upload"  # a finalized resumable upload of a device


class ReceiptStatus(StrEnum):
    STORED = "stored"  # de-identified, encrypted and indexed now
    DUPLICATE = "duplicate"  # the same SOP Instance UID was stored before: nothing changed
    QUARANTINED = "quarantined"  # burned-in text without a matching pixel rule: kept apart


@dataclass(frozen=True, slots=True)
class IngestOrigin:
    """Who sends: the institution the instance belongs to, the acting subject (a user, a
    device or a DICOM node, as the audit log names it) and the device, if any.

    ``institution_id`` is the sender's institution; an instance always joins it.
    """

    institution_id: str
    subject: Subject
    channel: IngestChannel
    device_id: str | None = None


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the sender gets back for one accepted instance.

    ``sha256`` and ``size`` are of the bytes as received (the sender compares them with
    what it sent). The UIDs are the de-identified ones phivault stores and answers with;
    for a quarantined instance they are the UIDs it will have once released.
    ``instance_id`` is the index row (stored, duplicate) or the quarantine entry.
    ``received_sop_instance_uid`` is the SOP Instance UID as the sender sent it (for its own
    bookkeeping, e.g. the Referenced SOP Sequence of a STOW-RS response).
    """

    status: ReceiptStatus
    instance_id: str
    sha256: str
    size: int
    sop_class_uid: str
    received_sop_instance_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    study_id: str | None  # the exam, once stored (None while quarantined)
