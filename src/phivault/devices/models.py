"""Tables of devices (main database; migration 0007).

Secrets are stored as SHA-256 digests only: activation codes (≥ 125 bits) and device
access tokens (256 bits). A device's public key is stored with its RFC 7638 thumbprint;
its private key never leaves the device. Upload chunks are objects of the object store,
encrypted under the upload's own key of the hierarchy (``patient_key_id``), destroyed
when the upload ends.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.models import Base

DIGEST = 64  # hex SHA-256
THUMBPRINT = 43  # base64url SHA-256, RFC 7638
MAX_SERIAL = 64


class ActivationCode(Base):
    """A single-use code an institution admin gives a device to activate it."""

    __tablename__ = "device_activation_codes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    digest: Mapped[str] = mapped_column(String(DIGEST), unique=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), index=True)
    serial: Mapped[str | None] = mapped_column(String(MAX_SERIAL))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    device_id: Mapped[str | None] = mapped_column(String(36))


class Device(Base):
    """An activated device: its institution and the public key its proofs are signed with."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), index=True)
    serial: Mapped[str | None] = mapped_column(String(MAX_SERIAL))
    jkt: Mapped[str] = mapped_column(String(THUMBPRINT), unique=True)
    public_jwk: Mapped[dict[str, Any]]
    activated_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class DeviceToken(Base):
    """A short-lived access token, bound to the key thumbprint ``jkt`` (RFC 9449 §6)."""

    __tablename__ = "device_tokens"

    digest: Mapped[str] = mapped_column(String(DIGEST), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    jkt: Mapped[str] = mapped_column(String(THUMBPRINT))
    expires_at: Mapped[datetime] = mapped_column(index=True)


class DpopProofSeen(Base):
    """The replay cache (RFC 9449 §11.1): each proof's (key, jti) once, until it could no
    longer be accepted anyway. In the database, so every replica refuses a replay.
    """

    __tablename__ = "dpop_proofs_seen"

    digest: Mapped[str] = mapped_column(String(DIGEST), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class DeviceSecretKey(Base):
    """The key that makes and checks DPoP server nonces, wrapped by the keyring (one row):
    every replica derives the same nonces without keeping any state.
    """

    __tablename__ = "device_secret_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]


class UploadStatus(StrEnum):
    OPEN = "open"  # taking chunks
    FINALIZING = "finalizing"  # handed to ingest, under a lease
    FINISHED = "finished"  # ingested; ``receipt`` kept for repeated finalize calls
    REJECTED = "rejected"  # the ingest pipeline refused the content (``problem_code``)
    FAILED = "failed"  # the SHA-256 of the whole did not match
    CANCELLED = "cancelled"  # DELETE by the device, or its revocation
    EXPIRED = "expired"  # abandoned


UNFINISHED = (UploadStatus.OPEN.value, UploadStatus.FINALIZING.value)


class Upload(Base):
    """A resumable upload of one exam file by one device."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    # The device's own reference (tus Upload-Metadata ``client-ref``): a repeated creation
    # after a lost answer finds the same upload. Random, never a file name.
    client_ref: Mapped[str | None] = mapped_column(String(64))
    length: Mapped[int] = mapped_column(BigInteger)
    offset: Mapped[int] = mapped_column(BigInteger)
    patient_key_id: Mapped[str] = mapped_column(ForeignKey("patient_keys.id"))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    receipt: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    problem_code: Mapped[str | None] = mapped_column(String(64))
    problem_detail: Mapped[str | None] = mapped_column(String(300))
    objects_deleted: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        Index("ix_uploads_device_status", "device_id", "status"),
        Index("ix_uploads_status_expires", "status", "expires_at"),
        Index("ix_uploads_institution", "institution_id"),
    )


class UploadChunk(Base):
    """One acknowledged chunk: ``length`` plaintext bytes at ``start``, stored encrypted as
    ``object_key``. Written in the transaction that advances the upload's offset, after
    the object: a chunk is either wholly recorded or not at all.
    """

    __tablename__ = "upload_chunks"

    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True)
    start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    length: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(DIGEST))
    created_at: Mapped[datetime]
