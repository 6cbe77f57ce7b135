"""Tables of the key hierarchy (main database, migration 0003; DESIGN §4).

- ``institution_keys``: one row per version of an institution's key, wrapped by a root key
  version of the keyring (``root_key_id``/``root_version`` say which). Rows are never
  deleted: a retired version is kept so that its id stays meaningful in old backups.
- ``patient_keys``: one row per patient key, wrapped by the institution key version named
  by ``institution_key_id``. Destroying it (crypto-shredding) sets ``wrapped_key`` to NULL.
- ``purge_ledger``: append-only (database triggers refuse UPDATE and DELETE) list of
  destroyed patient keys; backups re-apply it after every restore.
- ``key_rotations``: the state of resumable re-wrap jobs.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.models import Base


class InstitutionKeyStatus(StrEnum):
    CURRENT = "current"  # wraps new patient keys
    PREVIOUS = "previous"  # superseded; still wraps patient keys until the re-wrap job ends
    RETIRED = "retired"  # wraps nothing any more


class RotationScope(StrEnum):
    ROOT = "root"
    INSTITUTION = "institution"


class RotationStatus(StrEnum):
    REWRAPPING = "rewrapping"
    SETTLING = "settling"  # root only: waiting out keys wrapped by in-flight transactions
    COMPLETED = "completed"


class PurgeReason(StrEnum):
    """Why a patient key was destroyed; the ledger stores the code, never free text."""

    ERASURE_REQUEST = "erasure_request"  # the patient or institution asked (GDPR Art. 17)
    RETENTION_EXPIRED = "retention_expired"
    INSTITUTION_OFFBOARDED = "institution_offboarded"
    ADMINISTRATIVE = "administrative"
    TRANSIENT = "transient"  # a short-lived key whose data was consumed (an upload's chunks)


class InstitutionKey(Base):
    __tablename__ = "institution_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # A plain string: the institutions table arrives in a later migration.
    institution_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)  # WrappedKey.to_bytes()
    root_key_id: Mapped[str] = mapped_column(String(200))
    root_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    retired_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("institution_id", "version", name="uq_institution_keys_institution_version"),
        Index("ix_institution_keys_institution_id", "institution_id"),
        Index("ix_institution_keys_root_version", "root_version"),
        # At most one current version per institution, whatever the application does.
        Index(
            "uq_institution_keys_one_current",
            "institution_id",
            unique=True,
            sqlite_where=text("status = 'current'"),
            postgresql_where=text("status = 'current'"),
        ),
    )


class PatientKey(Base):
    __tablename__ = "patient_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(64))
    institution_key_id: Mapped[str] = mapped_column(ForeignKey("institution_keys.id"))
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)  # NULL once destroyed
    created_at: Mapped[datetime]
    destroyed_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_patient_keys_institution_id", "institution_id"),
        Index("ix_patient_keys_institution_key_id", "institution_key_id"),
    )


class PurgeLedgerEntry(Base):
    __tablename__ = "purge_ledger"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    patient_key_id: Mapped[str] = mapped_column(String(36), unique=True)
    institution_id: Mapped[str] = mapped_column(String(64))
    destroyed_at: Mapped[datetime]
    actor_type: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(32))

    __table_args__ = (Index("ix_purge_ledger_institution_id", "institution_id"),)


class KeyRotation(Base):
    __tablename__ = "key_rotations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))
    # "root" or "institution:<id>": one active rotation per scope (partial unique index).
    scope_key: Mapped[str] = mapped_column(String(100))
    institution_id: Mapped[str | None] = mapped_column(String(64))
    from_version: Mapped[int] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    cursor: Mapped[str | None] = mapped_column(String(36))  # id of the last key re-wrapped
    total: Mapped[int] = mapped_column(Integer)  # keys to re-wrap when the rotation started
    rewrapped: Mapped[int] = mapped_column(Integer)
    batches: Mapped[int] = mapped_column(Integer)
    retired_version: Mapped[int | None] = mapped_column(Integer)  # root: what was retired
    settle_until: Mapped[datetime | None]
    started_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]

    __table_args__ = (
        Index(
            "uq_key_rotations_one_active",
            "scope_key",
            unique=True,
            sqlite_where=text("status <> 'completed'"),
            postgresql_where=text("status <> 'completed'"),
        ),
        Index("ix_key_rotations_started_at", "started_at"),
    )
