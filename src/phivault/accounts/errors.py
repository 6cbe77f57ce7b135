"""Errors of the accounts service. Each names the HTTP status and the stable problem
``code`` it answers with (``accounts.api`` turns them into RFC 9457 problems), and a
default message that says what to do without revealing more than the caller may know.
"""

from __future__ import annotations

from typing import Any


class AccountsError(Exception):
    status: int = 400
    code: str = "bad_request"
    message: str = "the request cannot be carried out"

    def __init__(self, detail: str | None = None, **extensions: Any) -> None:  # noqa: ANN401
        super().__init__(detail or self.message)
        self.detail = detail or self.message
        self.extensions = extensions
        self.headers: dict[str, str] = {}


class InvalidCredentials(AccountsError):
    # One answer for an unknown e-mail, a wrong password and a locked account (ASVS 6.3.8).
    status, code, message = 401, "invalid_credentials", "the e-mail address or password is not correct"


class MfaRequired(AccountsError):
    status, code, message = 401, "mfa_required", "send a TOTP or recovery code to /api/v1/auth/mfa/verify"

    def __init__(self, mfa_token: str, expires_in: int) -> None:
        super().__init__(mfa_token=mfa_token, expires_in=expires_in)


class InvalidMfaCode(AccountsError):
    status, code, message = (
        401,
        "invalid_mfa_code",
        "the code is not valid; sign in again if this keeps failing",
    )


class InvalidMfaToken(AccountsError):
    status, code, message = 401, "invalid_mfa_token", "the sign-in has expired; sign in again"


class InvalidGrant(AccountsError):
    # RFC 6749 §5.2's name for a refresh token that is invalid, expired, revoked or reused.
    status, code, message = 401, "invalid_grant", "the refresh token is not valid; sign in again"


class Unauthenticated(AccountsError):
    status, code, message = 401, "unauthorized", "a valid access token is required"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail)
        self.headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class Throttled(AccountsError):
    status, code, message = 429, "rate_limited", "too many failed attempts from this address; retry later"

    def __init__(self, retry_after: int) -> None:
        super().__init__()
        self.headers = {"Retry-After": str(max(1, retry_after))}


class Forbidden(AccountsError):
    status, code, message = 403, "forbidden", "your role does not allow this"


class IpNotAllowed(AccountsError):
    status, code, message = 403, "ip_not_allowed", "administration is only allowed from the admin networks"


class PasswordChangeRequired(AccountsError):
    status, code, message = (
        403,
        "password_change_required",
        "change your password first (/api/v1/auth/password)",
    )


class OneTimePasswordExpired(AccountsError):
    # Given only with the right password, so it reveals nothing to a guesser.
    status, code, message = (
        401,
        "one_time_password_expired",
        "this one-time password has expired; ask an administrator for a new one",
    )


class MfaEnrolmentRequired(AccountsError):
    status, code, message = 403, "mfa_enrolment_required", "set up TOTP first (/api/v1/auth/mfa/totp)"


class ReauthenticationRequired(AccountsError):
    status, code, message = (
        403,
        "reauthentication_required",
        "confirm your password first (/api/v1/auth/reauthenticate)",
    )


class NotFound(AccountsError):
    # Also the answer for another tenant's object: its existence is not revealed.
    status, code, message = 404, "not_found", "no such object"


class Conflict(AccountsError):
    status, code, message = 409, "conflict", "the request conflicts with the current state"

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code  # a specific conflict's stable code


class PasswordRejected(AccountsError):
    status, code, message = 422, "password_policy", "the password does not meet the password policy"

    def __init__(self, reasons: list[str]) -> None:
        super().__init__(reasons=reasons)


class WrongPassword(AccountsError):
    # An authenticated user's password check (re-authentication, password change): not a
    # 401, which would tell clients their access token is no longer valid.
    status, code, message = 403, "wrong_password", "the password is not correct"


class CodeRejected(AccountsError):
    status, code, message = 422, "invalid_mfa_code", "the code is not valid; check the authenticator's clock"


class InvalidResetToken(AccountsError):
    status, code, message = (
        400,
        "invalid_reset_token",
        "the reset link is not valid or has expired; ask again",
    )


class InvalidInput(AccountsError):
    status, code, message = 422, "validation_error", "the request is invalid"
