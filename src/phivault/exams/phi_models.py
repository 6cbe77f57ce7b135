"""Tables of the PHI store: its own database (``PHIVAULT_PHI_DATABASE_URL``).

Every PHI value is sealed with ``KeyHierarchy.encrypt_field`` under the patient's key and
bound to its table, column and row id, so a value copied to another row or patient does
not decrypt. Lookups never decrypt: they compare HMAC blind indexes keyed by the
institution's secret (exact match on PatientID + issuer, on accession number, on study
date). A row here always belongs to an index row of the main database with the same id
(instances, studies) or to a patient that has one; the sweeper removes rows left behind
by a crash between the two databases' commits.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.models import PhiBase

BLIND_INDEX_LENGTH = 64  # hex SHA-256
TOKEN_LENGTH = 32  # hex, a truncated HMAC-SHA256 (name_index.TOKEN_LENGTH)


class PhiPatient(PhiBase):
    """A patient of one institution. ``id`` is the pseudonym used everywhere else."""

    __tablename__ = "phi_patients"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(36))
    patient_key_id: Mapped[str] = mapped_column(String(36))
    # HMAC(institution secret, issuer ‖ PatientID): exact match without decrypting.
    patient_id_index: Mapped[str] = mapped_column(String(BLIND_INDEX_LENGTH))
    patient_id: Mapped[bytes] = mapped_column(LargeBinary)  # sealed
    issuer_of_patient_id: Mapped[bytes] = mapped_column(LargeBinary)
    patient_name: Mapped[bytes] = mapped_column(LargeBinary)
    birth_date: Mapped[bytes] = mapped_column(LargeBinary)
    sex: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("institution_id", "patient_id_index"),)


class PhiStudy(PhiBase):
    """The PHI of one study (``id`` = ``studies.id`` of the main database)."""

    __tablename__ = "phi_studies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(36))
    patient_id: Mapped[str] = mapped_column(ForeignKey("phi_patients.id"))
    accession_number_index: Mapped[str | None] = mapped_column(String(BLIND_INDEX_LENGTH))
    study_date_index: Mapped[str | None] = mapped_column(String(BLIND_INDEX_LENGTH))
    record: Mapped[bytes] = mapped_column(LargeBinary)  # sealed JSON: accession, dates, names, UID
    created_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_phi_studies_patient", "patient_id"),
        Index("ix_phi_studies_accession", "institution_id", "accession_number_index"),
        Index("ix_phi_studies_date", "institution_id", "study_date_index"),
    )


class PhiInstance(PhiBase):
    """The PHI of one instance (``id`` = ``instances.id``): every value the de-identification
    removed or replaced, and the original UIDs, as one sealed JSON document — what the
    hospital's PACS gets back when the instance is exported re-identified.
    """

    __tablename__ = "phi_instances"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(36))
    patient_id: Mapped[str] = mapped_column(ForeignKey("phi_patients.id"))
    study_id: Mapped[str] = mapped_column(String(36))
    record: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_phi_instances_study", "study_id"),
        Index("ix_phi_instances_patient", "patient_id"),
        Index("ix_phi_instances_created", "created_at"),
    )


class PhiPatientToken(PhiBase):
    """One blind-index token of a patient's name or PatientID (``name_index``): HMACs keyed
    by the institution's secret, so QIDO-RS finds patients without decrypting them.
    """

    __tablename__ = "phi_patient_tokens"

    institution_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    token: Mapped[str] = mapped_column(String(TOKEN_LENGTH), primary_key=True)
    # Cascade: whoever deletes a patient (the sweeper, exam deletion) deletes its tokens.
    patient_id: Mapped[str] = mapped_column(
        ForeignKey("phi_patients.id", ondelete="CASCADE"), primary_key=True
    )

    __table_args__ = (Index("ix_phi_patient_tokens_patient", "patient_id"),)
