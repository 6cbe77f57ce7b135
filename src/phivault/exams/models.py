"""Tables of the main database for exams: the de-identified index, quarantine, ingest policy.

Nothing here holds PHI: UIDs are the institution's remapped ones, descriptions and dates
are the de-identified values (PS3.15 Annex E), and the patient is named by its pseudonym
(the id of its row in the PHI store). The PHI itself lives in ``phi_models`` (its own
database). Every row carries ``institution_id`` and every query is scoped by it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.models import Base

UID_LENGTH = 64  # PS3.5 §9.1


class Study(Base):
    """One exam: a DICOM study of one patient in one institution (de-identified attributes)."""

    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"))
    # The patient's pseudonym: the id of its PHI-store row; also PatientID/PatientName of
    # the de-identified instances. Opaque, random, never derived from PHI.
    patient_ref: Mapped[str] = mapped_column(String(36))
    patient_key_id: Mapped[str] = mapped_column(ForeignKey("patient_keys.id"))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    modalities: Mapped[str] = mapped_column(String(64), default="")  # backslash-separated
    number_of_series: Mapped[int] = mapped_column(Integer, default=0)
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0)
    size: Mapped[int] = mapped_column(BigInteger, default=0)  # stored instance bytes
    archived_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    # A legal hold keeps the exam whatever the retention setting says (exams/service.py).
    legal_hold_at: Mapped[datetime | None] = mapped_column(default=None)
    legal_hold_by: Mapped[str | None] = mapped_column(String(36), default=None)

    __table_args__ = (
        UniqueConstraint("institution_id", "study_instance_uid"),
        Index("ix_studies_institution_created", "institution_id", "created_at"),
        Index("ix_studies_institution_patient", "institution_id", "patient_ref"),
    )


class ExamComment(Base):
    """A clinician's comment on an exam. Free text may name the patient, so the body is
    sealed under the patient's key (shredded with it) and shown only to PHI readers.
    """

    __tablename__ = "exam_comments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"))
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"))
    author_id: Mapped[str] = mapped_column(String(36))
    body: Mapped[bytes] = mapped_column(LargeBinary)  # KeyHierarchy.encrypt_field
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (Index("ix_exam_comments_study", "study_id", "created_at"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(36))
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"))
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("institution_id", "series_instance_uid"),
        Index("ix_series_study", "study_id"),
    )


class Instance(Base):
    """One stored, de-identified, encrypted instance."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(36))
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"))
    series_id: Mapped[str] = mapped_column(ForeignKey("series.id"))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    object_key: Mapped[str] = mapped_column(String(200), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)  # de-identified plaintext bytes
    sha256: Mapped[str] = mapped_column(String(64))  # of the de-identified plaintext
    received_size: Mapped[int] = mapped_column(BigInteger)
    received_sha256: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    device_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("institution_id", "sop_instance_uid"),
        Index("ix_instances_series", "series_id"),
        Index("ix_instances_study", "study_id"),
        Index("ix_instances_institution_size", "institution_id", "received_size"),
        Index("ix_instances_device_size", "device_id", "received_size"),
    )


class QuarantineStatus(StrEnum):
    PENDING = "pending"
    RELEASED = "released"  # a pixel rule was applied and the instance stored
    REJECTED = "rejected"  # an admin refused it; its bytes are deleted


class QuarantinedInstance(Base):
    """An instance with burned-in text no pixel rule covered: kept as received, encrypted
    under its patient's key, never stored as de-identified until an admin decides.

    Manufacturer and model name identify a device type, not a person (the profile keeps
    them); they help the admin choose a rule.
    """

    __tablename__ = "quarantined_instances"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"))
    patient_key_id: Mapped[str] = mapped_column(ForeignKey("patient_keys.id"))
    patient_ref: Mapped[str] = mapped_column(String(36))
    object_key: Mapped[str | None] = mapped_column(String(200), unique=True)  # None once rejected
    reason: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16), default=QuarantineStatus.PENDING.value)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))  # remapped
    modality: Mapped[str] = mapped_column(String(16), default="")
    manufacturer: Mapped[str] = mapped_column(String(64), default="")
    model_name: Mapped[str] = mapped_column(String(64), default="")
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    received_size: Mapped[int] = mapped_column(BigInteger)
    received_sha256: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    device_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime]
    resolved_at: Mapped[datetime | None]
    resolved_by: Mapped[str | None] = mapped_column(String(36))
    instance_id: Mapped[str | None] = mapped_column(String(36))  # once released

    __table_args__ = (
        Index("ix_quarantine_institution_status", "institution_id", "status", "created_at"),
        Index("ix_quarantine_institution_sop", "institution_id", "sop_instance_uid"),
        Index("ix_quarantine_device_size", "device_id", "received_size"),
    )


class IngestPolicy(Base):
    """An institution's de-identification options, private-tag allow-list, pixel rules and
    storage quotas. No row: the defaults (Basic Profile only, default rules, settings).
    """

    __tablename__ = "ingest_policies"

    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), primary_key=True)
    retain_modified_dates: Mapped[bool] = mapped_column(Boolean, default=False)
    retain_device_identity: Mapped[bool] = mapped_column(Boolean, default=False)
    retain_patient_characteristics: Mapped[bool] = mapped_column(Boolean, default=False)
    clean_descriptors: Mapped[bool] = mapped_column(Boolean, default=False)
    private_allow_list: Mapped[list[Any]] = mapped_column(JSON, default=list)
    pixel_rules: Mapped[list[Any]] = mapped_column(JSON, default=list)
    institution_quota_bytes: Mapped[int | None] = mapped_column(BigInteger)
    device_quota_bytes: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime]


class DeviceQuota(Base):
    """A per-device storage quota overriding the institution's default for devices."""

    __tablename__ = "device_quotas"

    device_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(36), index=True)
    quota_bytes: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime]


class InstitutionSecret(Base):
    """The institution's ingest secret: keys the UID remapping, date offsets and the PHI
    store's blind index. 32 random bytes sealed under a dedicated key of the hierarchy
    (``patient_keys`` row, so root and institution key rotation re-wrap it like any other);
    stable for the institution's life, so remapped UIDs and blind indexes stay valid.
    """

    __tablename__ = "institution_secrets"

    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), primary_key=True)
    patient_key_id: Mapped[str] = mapped_column(ForeignKey("patient_keys.id"))
    sealed_secret: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]


class DicomNode(Base):
    """A DICOM application entity allowed to send to the C-STORE SCP, mapped to an
    institution (and optionally a device). Unknown calling AE titles are rejected.
    """

    __tablename__ = "dicom_nodes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), index=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    device_id: Mapped[str | None] = mapped_column(String(36))
    description: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime]


class OrphanCandidate(Base):
    """An object-store key the sweeper found unreferenced; deleted if still unreferenced
    after the grace period (an ingest in flight writes its object before its row).
    """

    __tablename__ = "orphan_candidates"

    object_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    first_seen_at: Mapped[datetime]
