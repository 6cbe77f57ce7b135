"""Request and response bodies of the accounts routes.

Credentials are capped before anything else looks at them: an e-mail address at 254
characters (RFC 5321), a password at 1024 bytes of UTF-8 (ASVS 6.2.9 asks that 64
characters be allowed; a cap keeps hashing bounded). Every request model carries an
example: the OpenAPI document shows it, and the route-matrix test sends it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

from phivault.accounts.models import MAX_EMAIL
from phivault.accounts.passwords import MAX_PASSWORD_BYTES, MAX_POLICY_LENGTH, MIN_POLICY_LENGTH
from phivault.accounts.service import (
    InstitutionInfo,
    InstitutionSettings,
    SessionInfo,
    TokenPair,
    UserInfo,
)

MAX_TOKEN = 512


def _password_bytes(value: str) -> str:
    if len(value.encode("utf-8", errors="surrogatepass")) > MAX_PASSWORD_BYTES:
        msg = f"at most {MAX_PASSWORD_BYTES} bytes of UTF-8"
        raise ValueError(msg)
    return value


Email = Annotated[str, Field(min_length=3, max_length=MAX_EMAIL, examples=["ada@example.org"])]
Password = Annotated[str, Field(min_length=1, max_length=MAX_PASSWORD_BYTES), AfterValidator(_password_bytes)]
Token = Annotated[str, Field(min_length=1, max_length=MAX_TOKEN)]
AssignableRole = Literal["institution_admin", "clinician", "auditor"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _example(values: dict[str, JsonValue]) -> ConfigDict:
    return ConfigDict(extra="forbid", json_schema_extra={"examples": [values]})


# -- sign-in ---------------------------------------------------------------------------


class LoginRequest(_Request):
    model_config = _example({"email": "ada@example.org", "password": "correct horse battery staple"})  # nosec B105  # an OpenAPI example, not a credential
    email: Email
    password: Password


class MfaVerifyRequest(_Request):
    model_config = _example({"mfa_token": "mfa-token-from-the-login-problem", "code": "123456"})  # nosec B105  # an OpenAPI example, not a credential
    mfa_token: Token
    code: Annotated[str, Field(min_length=1, max_length=64, description="a TOTP code or a recovery code")]


class RefreshRequest(_Request):
    model_config = _example({"refresh_token": "refresh-token-from-the-last-token-response"})  # nosec B105  # an OpenAPI example, not a credential
    refresh_token: Token


class TokenResponse(BaseModel):
    """RFC 6749 §5.1 field names."""

    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    refresh_token: str

    @classmethod
    def of(cls, pair: TokenPair) -> TokenResponse:
        return cls(
            access_token=pair.access_token,
            token_type="Bearer",  # noqa: S106   # nosec B106 # RFC 6749 §7.1 token type, not a secret
            expires_in=pair.expires_in,
            refresh_token=pair.refresh_token,
        )


class ReauthenticateRequest(_Request):
    model_config = _example({"password": "correct horse battery staple"})  # nosec B105  # an OpenAPI example, not a credential
    password: Password


class PasswordChangeRequest(_Request):
    model_config = _example(
        {"current_password": "correct horse battery staple", "new_password": "a new long passphrase"}  # nosec B105  # an OpenAPI example, not a credential
    )
    current_password: Password
    new_password: Password


class EmailChangeRequest(_Request):
    model_config = _example({"email": "ada.lovelace@example.org"})
    email: Email


class PasswordResetRequest(_Request):
    model_config = _example({"email": "ada@example.org"})
    email: Email


class PasswordResetConfirm(_Request):
    model_config = _example({"token": "token-from-the-reset-link", "new_password": "a new long passphrase"})  # nosec B105  # an OpenAPI example, not a credential
    token: Token
    new_password: Password


# -- MFA -------------------------------------------------------------------------------


class TotpEnrolmentResponse(BaseModel):
    secret: str = Field(description="base32 seed, for typing into an authenticator app")
    otpauth_uri: str
    qr_code: str = Field(description="the otpauth URI as an SVG QR code, a data: URI")


class TotpConfirmRequest(_Request):
    model_config = _example({"code": "123456"})
    code: Annotated[str, Field(pattern=r"^[0-9]{6}$")]


class RecoveryCodesResponse(BaseModel):
    recovery_codes: list[str] = Field(description="shown once; each works once instead of a TOTP code")


# -- sessions and users ----------------------------------------------------------------


class SessionOut(BaseModel):
    id: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    ip: str | None
    user_agent: str | None
    current: bool

    @classmethod
    def of(cls, info: SessionInfo) -> SessionOut:
        return cls.model_validate(info, from_attributes=True)


class SessionsResponse(BaseModel):
    sessions: list[SessionOut]


class UserOut(BaseModel):
    id: str
    institution_id: str | None
    email: str
    role: str
    created_at: datetime
    disabled: bool
    mfa_enabled: bool
    must_change_password: bool

    @classmethod
    def of(cls, info: UserInfo) -> UserOut:
        return cls.model_validate(info, from_attributes=True)


class UserCreateRequest(_Request):
    model_config = _example(
        {"email": "grace@example.org", "role": "clinician", "password": "a long enough passphrase"}  # nosec B105  # an OpenAPI example, not a credential
    )
    email: Email
    role: AssignableRole
    password: Password | None = Field(
        default=None, description="omit to have a one-time password generated and returned"
    )
    must_change_password: bool = True


class UserCreated(UserOut):
    one_time_password: str | None = Field(description="set when no password was given; shown once")


class UsersResponse(BaseModel):
    users: list[UserOut]


class RoleChangeRequest(_Request):
    model_config = _example({"role": "auditor"})
    role: AssignableRole


class EndedSessions(BaseModel):
    ended: int


# -- institutions ----------------------------------------------------------------------


class InstitutionCreateRequest(_Request):
    model_config = _example({"name": "St Example Hospital"})
    name: Annotated[str, Field(min_length=1, max_length=200)]
    region: Annotated[str | None, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")] = None


class InstitutionOut(BaseModel):
    id: str
    name: str
    region: str
    created_at: datetime

    @classmethod
    def of(cls, info: InstitutionInfo) -> InstitutionOut:
        return cls.model_validate(info, from_attributes=True)


class InstitutionsResponse(BaseModel):
    institutions: list[InstitutionOut]


class PasswordPolicyOut(BaseModel):
    min_length: int
    require_uppercase: bool
    require_lowercase: bool
    require_digit: bool
    require_symbol: bool


class InstitutionSettingsOut(BaseModel):
    idle_timeout_minutes: int
    mfa_required_admins: bool
    mfa_required_everyone: bool
    password_policy: PasswordPolicyOut

    @classmethod
    def of(cls, info: InstitutionSettings) -> InstitutionSettingsOut:
        return cls.model_validate(info, from_attributes=True)


class InstitutionSettingsPatch(_Request):
    model_config = _example({"idle_timeout_minutes": 30, "mfa_required_everyone": True})
    idle_timeout_minutes: Annotated[int | None, Field(ge=5, le=60)] = None
    mfa_required_admins: bool | None = None
    mfa_required_everyone: bool | None = None
    password_min_length: Annotated[int | None, Field(ge=MIN_POLICY_LENGTH, le=MAX_POLICY_LENGTH)] = None
    require_uppercase: bool | None = None
    require_lowercase: bool | None = None
    require_digit: bool | None = None
    require_symbol: bool | None = None
