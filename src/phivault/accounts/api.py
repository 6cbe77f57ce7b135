"""Routes of accounts: sign-in, sessions, MFA, password reset, users and institutions.

Every route declares who may call it (``Public``, ``SetupPrincipal``/``CurrentPrincipal``
or ``require(permission)``); the services check permissions again and scope by tenant.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response, status

from phivault.accounts.permissions import Permission, Role
from phivault.accounts.principal import Principal
from phivault.accounts.schemas import (
    EmailChangeRequest,
    EndedSessions,
    InstitutionCreateRequest,
    InstitutionOut,
    InstitutionSettingsOut,
    InstitutionSettingsPatch,
    InstitutionsResponse,
    LoginRequest,
    MfaVerifyRequest,
    PasswordChangeRequest,
    PasswordResetConfirm,
    PasswordResetRequest,
    ReauthenticateRequest,
    RecoveryCodesResponse,
    RefreshRequest,
    RoleChangeRequest,
    SessionOut,
    SessionsResponse,
    TokenResponse,
    TotpConfirmRequest,
    TotpEnrolmentResponse,
    UserCreated,
    UserCreateRequest,
    UserOut,
    UsersResponse,
)
from phivault.accounts.service import SettingsChange
from phivault.http.deps import (
    CurrentPrincipal,
    Public,
    RequestContextDep,
    RuntimeDep,
    SetupPrincipal,
    require,
)

router = APIRouter(prefix="/api/v1", tags=["accounts"])

ObjectId = Annotated[str, Path(min_length=1, max_length=64)]
UserManager = Annotated[Principal, Depends(require(Permission.USER_MANAGE))]
InstitutionManager = Annotated[Principal, Depends(require(Permission.INSTITUTION_MANAGE))]
InstitutionConfigurer = Annotated[Principal, Depends(require(Permission.INSTITUTION_CONFIGURE))]


# -- sign-in (public) ------------------------------------------------------------------


@router.post("/auth/login", response_model=TokenResponse, dependencies=[Public])
def login(body: LoginRequest, runtime: RuntimeDep, context: RequestContextDep) -> TokenResponse:
    """Sign in. When a second factor is due: 401 problem `mfa_required` with `mfa_token`."""
    return TokenResponse.of(runtime.accounts.login(body.email, body.password, context))


@router.post("/auth/mfa/verify", response_model=TokenResponse, dependencies=[Public])
def verify_mfa(body: MfaVerifyRequest, runtime: RuntimeDep, context: RequestContextDep) -> TokenResponse:
    """The second step of sign-in: the `mfa_token` and a TOTP or recovery code."""
    return TokenResponse.of(runtime.accounts.verify_mfa(body.mfa_token, body.code, context))


@router.post("/auth/refresh", response_model=TokenResponse, dependencies=[Public])
def refresh(body: RefreshRequest, runtime: RuntimeDep, context: RequestContextDep) -> TokenResponse:
    """A new token pair; the refresh token is spent, and a spent one ends its session."""
    return TokenResponse.of(runtime.accounts.refresh(body.refresh_token, context))


@router.post(
    "/auth/password-reset",
    status_code=status.HTTP_202_ACCEPTED,
    response_class=Response,
    responses={202: {"description": "accepted; a link is e-mailed if the address has an account"}},
    dependencies=[Public],
)
def request_password_reset(
    body: PasswordResetRequest, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    """E-mail a reset link if the address has an account; the answer is the same if not."""
    runtime.accounts.request_password_reset(body.email, context)
    return Response(status_code=status.HTTP_202_ACCEPTED)


@router.post("/auth/password-reset/confirm", status_code=status.HTTP_204_NO_CONTENT, dependencies=[Public])
def confirm_password_reset(
    body: PasswordResetConfirm, runtime: RuntimeDep, context: RequestContextDep
) -> None:
    """Set a new password with the token from the link; every session ends, MFA stays on."""
    runtime.accounts.confirm_password_reset(body.token, body.new_password, context)


# -- the signed-in user's own account --------------------------------------------------


@router.get("/auth/me", response_model=UserOut)
def me(principal: SetupPrincipal, runtime: RuntimeDep) -> UserOut:
    """The signed-in user; `must_change_password` and `mfa_enabled` tell what set-up is due."""
    return UserOut.of(runtime.accounts.me(principal))


@router.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT)
def logout(principal: SetupPrincipal, runtime: RuntimeDep, context: RequestContextDep) -> None:
    """End this session: its access and refresh tokens stop working at once."""
    runtime.accounts.logout(principal, context)


@router.post("/auth/reauthenticate", status_code=status.HTTP_204_NO_CONTENT)
def reauthenticate(
    body: ReauthenticateRequest, principal: SetupPrincipal, runtime: RuntimeDep, context: RequestContextDep
) -> None:
    """Confirm the password; e-mail and MFA changes need one within the last minutes."""
    runtime.accounts.reauthenticate(principal, body.password, context)


@router.post("/auth/password", status_code=status.HTTP_204_NO_CONTENT)
def change_password(
    body: PasswordChangeRequest, principal: SetupPrincipal, runtime: RuntimeDep, context: RequestContextDep
) -> None:
    """Change the password (current one required); the user's other sessions end."""
    runtime.accounts.change_password(principal, body.current_password, body.new_password, context)


@router.put("/auth/email", response_model=UserOut)
def change_email(
    body: EmailChangeRequest, principal: CurrentPrincipal, runtime: RuntimeDep, context: RequestContextDep
) -> UserOut:
    """Change the sign-in e-mail address (needs a recent password check)."""
    return UserOut.of(runtime.accounts.change_email(principal, body.email, context))


@router.get("/auth/sessions", response_model=SessionsResponse)
def list_sessions(principal: CurrentPrincipal, runtime: RuntimeDep) -> SessionsResponse:
    """The signed-in user's active sessions."""
    return SessionsResponse(sessions=[SessionOut.of(s) for s in runtime.accounts.list_sessions(principal)])


@router.delete("/auth/sessions/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
def end_session(
    session_id: ObjectId, principal: CurrentPrincipal, runtime: RuntimeDep, context: RequestContextDep
) -> None:
    """End one of the user's own sessions."""
    runtime.accounts.end_own_session(principal, session_id, context)


@router.post("/auth/mfa/totp", response_model=TotpEnrolmentResponse)
def begin_totp(
    principal: SetupPrincipal, runtime: RuntimeDep, context: RequestContextDep
) -> TotpEnrolmentResponse:
    """Start TOTP enrolment (needs a recent password check): a seed and its QR code."""
    enrolment = runtime.accounts.begin_totp(principal, context)
    return TotpEnrolmentResponse(
        secret=enrolment.secret, otpauth_uri=enrolment.otpauth_uri, qr_code=enrolment.qr_code
    )


@router.post("/auth/mfa/totp/confirm", response_model=RecoveryCodesResponse)
def confirm_totp(
    body: TotpConfirmRequest, principal: SetupPrincipal, runtime: RuntimeDep, context: RequestContextDep
) -> RecoveryCodesResponse:
    """Finish enrolment with a code from the app; returns ten recovery codes, once."""
    return RecoveryCodesResponse(recovery_codes=runtime.accounts.confirm_totp(principal, body.code, context))


@router.delete("/auth/mfa/totp", status_code=status.HTTP_204_NO_CONTENT)
def disable_totp(principal: CurrentPrincipal, runtime: RuntimeDep, context: RequestContextDep) -> None:
    """Turn TOTP off (needs a recent password check; refused where policy requires MFA)."""
    runtime.accounts.disable_totp(principal, context)


@router.post("/auth/mfa/recovery-codes", response_model=RecoveryCodesResponse)
def regenerate_recovery_codes(
    principal: CurrentPrincipal, runtime: RuntimeDep, context: RequestContextDep
) -> RecoveryCodesResponse:
    """Replace all recovery codes (needs a recent password check)."""
    return RecoveryCodesResponse(
        recovery_codes=runtime.accounts.regenerate_recovery_codes(principal, context)
    )


# -- users (institution admins) --------------------------------------------------------


@router.post("/users", response_model=UserCreated, status_code=status.HTTP_201_CREATED)
def create_user(
    body: UserCreateRequest, principal: UserManager, runtime: RuntimeDep, context: RequestContextDep
) -> UserCreated:
    """Create a user in the admin's institution."""
    user, one_time = runtime.accounts.create_user(
        principal,
        institution_id=principal.institution_id,
        email=body.email,
        role=Role(body.role),
        password=body.password,
        must_change_password=body.must_change_password,
        context=context,
    )
    return UserCreated(**UserOut.of(user).model_dump(), one_time_password=one_time)


@router.get("/users", response_model=UsersResponse)
def list_users(principal: UserManager, runtime: RuntimeDep) -> UsersResponse:
    """The users of the admin's institution."""
    return UsersResponse(users=[UserOut.of(user) for user in runtime.accounts.list_users(principal)])


@router.get("/users/{user_id}", response_model=UserOut)
def get_user(user_id: ObjectId, principal: UserManager, runtime: RuntimeDep) -> UserOut:
    return UserOut.of(runtime.accounts.get_user(principal, user_id))


@router.post("/users/{user_id}/disable", response_model=UserOut)
def disable_user(
    user_id: ObjectId, principal: UserManager, runtime: RuntimeDep, context: RequestContextDep
) -> UserOut:
    """Disable a user; their sessions end at once."""
    return UserOut.of(runtime.accounts.set_user_disabled(principal, user_id, disabled=True, context=context))


@router.post("/users/{user_id}/enable", response_model=UserOut)
def enable_user(
    user_id: ObjectId, principal: UserManager, runtime: RuntimeDep, context: RequestContextDep
) -> UserOut:
    return UserOut.of(runtime.accounts.set_user_disabled(principal, user_id, disabled=False, context=context))


@router.post("/users/{user_id}/end-sessions", response_model=EndedSessions)
def end_user_sessions(
    user_id: ObjectId, principal: UserManager, runtime: RuntimeDep, context: RequestContextDep
) -> EndedSessions:
    """End every session of a user."""
    return EndedSessions(ended=runtime.accounts.end_user_sessions(principal, user_id, context))


@router.post("/users/{user_id}/one-time-password", response_model=UserCreated)
def issue_one_time_password(
    user_id: ObjectId, principal: UserManager, runtime: RuntimeDep, context: RequestContextDep
) -> UserCreated:
    """Replace a user's password with a new one-time password (shown once; to be changed at
    first sign-in, within `PHIVAULT_ONE_TIME_PASSWORD_HOURS`); their sessions end.
    """
    user, one_time = runtime.accounts.issue_one_time_password(principal, user_id, context)
    return UserCreated(**UserOut.of(user).model_dump(), one_time_password=one_time)


@router.put("/users/{user_id}/role", response_model=UserOut)
def change_role(
    user_id: ObjectId,
    body: RoleChangeRequest,
    principal: UserManager,
    runtime: RuntimeDep,
    context: RequestContextDep,
) -> UserOut:
    """Change a user's role; it applies to their open sessions at once."""
    return UserOut.of(runtime.accounts.change_role(principal, user_id, Role(body.role), context))


# -- institutions ----------------------------------------------------------------------


@router.post("/institutions", response_model=InstitutionOut, status_code=status.HTTP_201_CREATED)
def create_institution(
    body: InstitutionCreateRequest,
    principal: InstitutionManager,
    runtime: RuntimeDep,
    context: RequestContextDep,
) -> InstitutionOut:
    """Create an institution (platform operators), pinned to this deployment's region."""
    return InstitutionOut.of(runtime.accounts.create_institution(principal, body.name, body.region, context))


@router.get("/institutions", response_model=InstitutionsResponse)
def list_institutions(principal: InstitutionManager, runtime: RuntimeDep) -> InstitutionsResponse:
    infos = runtime.accounts.list_institutions(principal)
    return InstitutionsResponse(institutions=[InstitutionOut.of(info) for info in infos])


@router.get("/institutions/{institution_id}", response_model=InstitutionOut)
def get_institution(
    institution_id: ObjectId, principal: InstitutionManager, runtime: RuntimeDep
) -> InstitutionOut:
    return InstitutionOut.of(runtime.accounts.get_institution(principal, institution_id))


@router.get("/institutions/{institution_id}/settings", response_model=InstitutionSettingsOut)
def get_institution_settings(
    institution_id: ObjectId, principal: InstitutionConfigurer, runtime: RuntimeDep
) -> InstitutionSettingsOut:
    """Password policy, idle timeout and MFA requirement of the admin's institution."""
    return InstitutionSettingsOut.of(runtime.accounts.institution_settings(principal, institution_id))


@router.patch("/institutions/{institution_id}/settings", response_model=InstitutionSettingsOut)
def update_institution_settings(
    institution_id: ObjectId,
    body: InstitutionSettingsPatch,
    principal: InstitutionConfigurer,
    runtime: RuntimeDep,
    context: RequestContextDep,
) -> InstitutionSettingsOut:
    change = SettingsChange(**body.model_dump())
    return InstitutionSettingsOut.of(
        runtime.accounts.update_institution_settings(principal, institution_id, change, context)
    )
