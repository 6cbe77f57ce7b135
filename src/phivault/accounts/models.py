"""Tables of accounts (main database; migration 0004).

Secrets are never stored in clear: passwords as Argon2id/PBKDF2 hashes, tokens (access,
refresh, MFA challenge, password reset) and recovery codes as SHA-256 digests (they carry
≥ 120 bits of entropy, ASVS 6.5.2), TOTP seeds encrypted under a keyring-wrapped key.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.models import Base

MAX_EMAIL = 254  # RFC 5321 §4.5.3.1.3: a path is at most 256 octets including the brackets
DIGEST = 64  # hex SHA-256


class Institution(Base):
    """A tenant, pinned to one region, with its own password, session and MFA policy."""

    __tablename__ = "institutions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    region: Mapped[str] = mapped_column(String(63))
    created_at: Mapped[datetime]
    idle_timeout_minutes: Mapped[int] = mapped_column(Integer, default=15)
    mfa_required_admins: Mapped[bool] = mapped_column(Boolean, default=True)
    mfa_required_everyone: Mapped[bool] = mapped_column(Boolean, default=False)
    password_min_length: Mapped[int] = mapped_column(Integer, default=12)
    require_uppercase: Mapped[bool] = mapped_column(Boolean, default=False)
    require_lowercase: Mapped[bool] = mapped_column(Boolean, default=False)
    require_digit: Mapped[bool] = mapped_column(Boolean, default=False)
    require_symbol: Mapped[bool] = mapped_column(Boolean, default=False)


class User(Base):
    """A person who signs in. Operators belong to no institution."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str | None] = mapped_column(ForeignKey("institutions.id"), index=True)
    email: Mapped[str] = mapped_column(String(MAX_EMAIL))
    # The sign-in key: the address in lower case. Sign-in names no institution, so it is
    # unique across the deployment.
    email_key: Mapped[str] = mapped_column(String(MAX_EMAIL), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    password_hash: Mapped[str] = mapped_column(String(512))
    password_changed_at: Mapped[datetime]
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]
    disabled_at: Mapped[datetime | None]
    totp_secret: Mapped[bytes | None] = mapped_column(LargeBinary)
    totp_pending_secret: Mapped[bytes | None] = mapped_column(LargeBinary)
    totp_enabled_at: Mapped[datetime | None]
    # RFC 6238 time step of the last accepted code: a code is accepted once (ASVS 6.5.1).
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)


class RecoveryCode(Base):
    __tablename__ = "recovery_codes"

    digest: Mapped[str] = mapped_column(String(DIGEST), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class AuthSession(Base):
    """One sign-in: the family of its access and refresh tokens (RFC 9700 §4.14.2)."""

    __tablename__ = "auth_sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    institution_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    expires_at: Mapped[datetime]  # the absolute lifetime
    # last password check (sign-in or re-authentication), for changes that need a recent one
    authenticated_at: Mapped[datetime]
    mfa_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    revoke_reason: Mapped[str | None] = mapped_column(String(32))
    ip: Mapped[str | None] = mapped_column(String(45))
    user_agent: Mapped[str | None] = mapped_column(String(256))


class AccessToken(Base):
    __tablename__ = "access_tokens"

    digest: Mapped[str] = mapped_column(String(DIGEST), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("auth_sessions.id", ondelete="CASCADE"), index=True)
    expires_at: Mapped[datetime]


class RefreshToken(Base):
    """A refresh token; ``used_at`` is set when it is exchanged. A second use is reuse."""

    __tablename__ = "refresh_tokens"

    digest: Mapped[str] = mapped_column(String(DIGEST), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("auth_sessions.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class MfaChallenge(Base):
    """A password check passed; the second factor is due (the ``mfa_token``)."""

    __tablename__ = "mfa_challenges"

    digest: Mapped[str] = mapped_column(String(DIGEST), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    used_at: Mapped[datetime | None]


class PasswordResetToken(Base):
    __tablename__ = "password_reset_tokens"

    digest: Mapped[str] = mapped_column(String(DIGEST), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class Throttle(Base):
    """Failed attempts for one key (an account or a client address), with back-off.

    Kept in the database so every replica sees the same count (DESIGN.md §8).
    """

    __tablename__ = "auth_throttles"

    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None]
    updated_at: Mapped[datetime]

    __table_args__ = (Index("ix_auth_throttles_updated_at", "updated_at"),)


class AccountSecretKey(Base):
    """The key that encrypts TOTP seeds, wrapped by the keyring (one row)."""

    __tablename__ = "account_secret_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
