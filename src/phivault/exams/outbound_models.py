"""Tables of what leaves an institution: share links, PACS destinations and exports.

Nothing here holds PHI. A share link is stored by the digest of its token (never the
token) and its passcode by an Argon2id hash; the recipient's e-mail address is a
colleague's, not the patient's. Exams are named by id without a foreign key, so deleting
an exam (``ExamService.delete``) is never held up by a share or an export of it: a share
or export whose exam is gone answers 404 / fails.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.models import Base


class ShareMode(StrEnum):
    VIEW = "view"  # the page and rendered previews
    DOWNLOAD = "download"  # also the de-identified DICOM instances


class ShareDelivery(StrEnum):
    LINK = "link"  # the link was given to its creator
    QUEUED = "queued"  # to be e-mailed to the recipient
    SENT = "sent"
    FAILED = "failed"  # the mail server refused it after the retries
    NOT_CONFIGURED = "not_configured"  # no SMTP server: the creator got the link instead


class ShareLink(Base):
    """A link to one exam for someone outside the institution, de-identified content only."""

    __tablename__ = "share_links"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"))
    study_id: Mapped[str] = mapped_column(String(36))
    created_by: Mapped[str] = mapped_column(String(36))
    # sha256 of the token (ids.token_digest); NULL while an e-mailed link is not yet made.
    token_digest: Mapped[str | None] = mapped_column(String(64), unique=True)
    passcode_hash: Mapped[str | None] = mapped_column(String(255))
    mode: Mapped[str] = mapped_column(String(16))
    recipient_email: Mapped[str | None] = mapped_column(String(254))
    delivery: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime]
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_by: Mapped[str | None] = mapped_column(String(36), default=None)
    # The egress guard found PHI in what the share would send: suspended until revoked.
    blocked_at: Mapped[datetime | None] = mapped_column(default=None)
    access_count: Mapped[int] = mapped_column(Integer, default=0)
    last_access_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_share_links_study", "institution_id", "study_id", "created_at"),)


class ShareItem(Base):
    """The instances a share shows, numbered 1… as they were when it was made: instances
    added to the exam later are not shared by an older link.
    """

    __tablename__ = "share_items"

    share_id: Mapped[str] = mapped_column(ForeignKey("share_links.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(36))


class PacsDestination(Base):
    """A DICOM C-STORE SCP of the institution (its PACS) that exams may be exported to."""

    __tablename__ = "pacs_destinations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"))
    name: Mapped[str] = mapped_column(String(100))
    ae_title: Mapped[str] = mapped_column(String(16))  # the PACS's (called AE title)
    host: Mapped[str] = mapped_column(String(253))
    port: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str] = mapped_column(String(16))  # phivault's, as the PACS knows it
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    ca_pem: Mapped[str | None] = mapped_column(Text)  # trust this CA instead of the system store
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("institution_id", "name"),)


class ExportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"  # the last attempt failed; another is scheduled
    COMPLETED = "completed"
    FAILED = "failed"  # no attempt left; ``reason`` says why


class ExportItemStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"  # the PACS confirmed it (C-STORE success or warning status)
    FAILED = "failed"  # the PACS refused it on the last attempt


class ExamExport(Base):
    """One export of an exam to a PACS destination; followed through its instance rows."""

    __tablename__ = "exam_exports"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"))
    study_id: Mapped[str] = mapped_column(String(36))
    destination_id: Mapped[str] = mapped_column(ForeignKey("pacs_destinations.id", ondelete="CASCADE"))
    requested_by: Mapped[str] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(500), default=None)  # ids and statuses only
    job_id: Mapped[str | None] = mapped_column(String(36), default=None)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_exam_exports_study", "institution_id", "study_id", "created_at"),)


class ExamExportItem(Base):
    """One instance of an export: sent once the PACS confirmed it, never sent again."""

    __tablename__ = "exam_export_items"

    export_id: Mapped[str] = mapped_column(
        ForeignKey("exam_exports.id", ondelete="CASCADE"), primary_key=True
    )
    instance_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    dimse_status: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(String(200), default=None)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)
