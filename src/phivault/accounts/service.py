"""The accounts service: institutions, users, sign-in, MFA, sessions and password reset.

Every method that acts for someone takes the acting ``Principal`` (or, from the CLI, a
``SystemSubject``), checks its permission and scopes every query by its institution: an
object of another tenant is ``NotFound``, never ``Forbidden`` (DESIGN.md §5).

Password hashes are computed between transactions, never inside one, so a burst of
sign-ins does not hold database locks (SQLite serialises writers) while hashing.
Failures that must be remembered (throttle counts, audit records) are committed first and
raised afterwards.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from phivault.accounts import mfa, throttle
from phivault.accounts.errors import (
    AccountsError,
    CodeRejected,
    Conflict,
    Forbidden,
    InvalidCredentials,
    InvalidGrant,
    InvalidInput,
    InvalidMfaCode,
    InvalidMfaToken,
    InvalidResetToken,
    IpNotAllowed,
    MfaRequired,
    NotFound,
    OneTimePasswordExpired,
    PasswordRejected,
    ReauthenticationRequired,
    Throttled,
    Unauthenticated,
    WrongPassword,
)
from phivault.accounts.mail import Mailer, mailer_for
from phivault.accounts.models import (
    MAX_EMAIL,
    AccessToken,
    AuthSession,
    Institution,
    MfaChallenge,
    PasswordResetToken,
    RecoveryCode,
    RefreshToken,
    User,
)
from phivault.accounts.passwords import (
    MAX_POLICY_LENGTH,
    MIN_POLICY_LENGTH,
    PasswordHasher,
    PasswordPolicy,
    hasher_for,
    normalise,
    one_time_password,
    policy_violations,
    too_long,
)
from phivault.accounts.permissions import ADMIN_ROLES, PLATFORM_ROLES, USER_ROLES, Permission, Role
from phivault.accounts.principal import Principal
from phivault.accounts.secretbox import SecretBox
from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.service import NO_CONTEXT, Actor, RequestContext, Subject, SystemSubject, Target, record
from phivault.clock import Clock
from phivault.config.settings import Settings
from phivault.crypto.keyring import Keyring
from phivault.db.engine import Database
from phivault.db.jobs import JobContext, JobRegistry, enqueue
from phivault.ids import new_id, new_token, token_digest

log = logging.getLogger(__name__)

RESET_MAIL_JOB = "accounts.password_reset_mail"
MFA_CHALLENGE_TTL = timedelta(minutes=5)
MFA_CHALLENGE_ATTEMPTS = 5
RESET_TOKEN_TTL = timedelta(minutes=15)
TOUCH_INTERVAL = timedelta(seconds=15)  # last-seen writes at most this often per session
MAX_TOKEN_LENGTH = 512
_SIGN_IN_GATE = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
_EMAIL_RE = re.compile(r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]{1,253}$")
_ANONYMOUS = SystemSubject(Actor(ActorType.ANONYMOUS, "anonymous"))
_TIMEOUTS = SystemSubject(Actor.system("session-timeout"))
PENDING_PASSWORD_CHANGE = "password_change"  # noqa: S105   # nosec B105 # a set-up step, not a password
PENDING_MFA_ENROLMENT = "mfa_enrolment"

Authority = Principal | SystemSubject
"""Who may manage accounts: a signed-in principal, or the ``phivault`` CLI (shell access
to the server is the platform operator's)."""


# -- values returned to callers -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    session_id: str


@dataclass(frozen=True, slots=True)
class InstitutionInfo:
    id: str
    name: str
    region: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class InstitutionSettings:
    idle_timeout_minutes: int
    mfa_required_admins: bool
    mfa_required_everyone: bool
    password_policy: PasswordPolicy


@dataclass(frozen=True, slots=True)
class UserInfo:
    id: str
    institution_id: str | None
    email: str
    role: Role
    created_at: datetime
    disabled: bool
    mfa_enabled: bool
    must_change_password: bool


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    ip: str | None
    user_agent: str | None
    current: bool


@dataclass(frozen=True, slots=True)
class TotpEnrolment:
    secret: str
    otpauth_uri: str
    qr_code: str


@dataclass(frozen=True, slots=True)
class Authentication:
    """A resolved access token. ``pending`` names set-up steps the user must finish
    before anything else (``password_change``, ``mfa_enrolment``).
    """

    principal: Principal
    pending: frozenset[str]


@dataclass(frozen=True, slots=True)
class SettingsChange:
    """Fields of ``InstitutionSettings`` to change; ``None`` leaves one as it is."""

    idle_timeout_minutes: int | None = None
    mfa_required_admins: bool | None = None
    mfa_required_everyone: bool | None = None
    password_min_length: int | None = None
    require_uppercase: bool | None = None
    require_lowercase: bool | None = None
    require_digit: bool | None = None
    require_symbol: bool | None = None


def normalise_email(email: str) -> tuple[str, str]:
    """(address as given, sign-in key); refuses what cannot be an address (RFC 5321 limits)."""
    address = email.strip()
    if len(address) > MAX_EMAIL or not _EMAIL_RE.fullmatch(address):
        raise InvalidInput("not an e-mail address")
    return address, address.lower()


def _user_info(user: User) -> UserInfo:
    return UserInfo(
        id=user.id,
        institution_id=user.institution_id,
        email=user.email,
        role=Role(user.role),
        created_at=user.created_at,
        disabled=user.disabled_at is not None,
        mfa_enabled=user.totp_enabled_at is not None,
        must_change_password=user.must_change_password,
    )


def _institution_info(row: Institution) -> InstitutionInfo:
    return InstitutionInfo(id=row.id, name=row.name, region=row.region, created_at=row.created_at)


def _settings_of(row: Institution) -> InstitutionSettings:
    return InstitutionSettings(
        idle_timeout_minutes=row.idle_timeout_minutes,
        mfa_required_admins=row.mfa_required_admins,
        mfa_required_everyone=row.mfa_required_everyone,
        password_policy=_policy_of(row),
    )


def _policy_of(row: Institution | None) -> PasswordPolicy:
    if row is None:
        return PasswordPolicy()
    return PasswordPolicy(
        min_length=row.password_min_length,
        require_uppercase=row.require_uppercase,
        require_lowercase=row.require_lowercase,
        require_digit=row.require_digit,
        require_symbol=row.require_symbol,
    )


def _require(actor: Authority, permission: Permission) -> None:
    if isinstance(actor, Principal) and not actor.has(permission):
        raise Forbidden


def _in_scope(actor: Authority, institution_id: str | None) -> bool:
    """Whether ``actor`` may see objects of ``institution_id`` (the CLI and platform
    principals see every institution; everyone else only their own).
    """
    if isinstance(actor, SystemSubject) or actor.institution_id is None:
        return True
    return actor.institution_id == institution_id


class Accounts:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        clock: Clock,
        keyring: Keyring,
        *,
        mailer: Mailer | None = None,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.hasher = hasher or hasher_for(settings)
        self.mailer = mailer or mailer_for(settings)
        self.secrets = SecretBox(keyring)
        self.access_ttl = timedelta(seconds=settings.access_token_seconds)
        self.absolute_lifetime = timedelta(hours=settings.session_absolute_hours)
        self.reauth_window = timedelta(minutes=settings.reauth_minutes)
        self._dummy_hash: str | None = None

    def register_jobs(self, registry: JobRegistry) -> None:
        registry.register(RESET_MAIL_JOB, self._send_reset_mail)

    # -- institutions -------------------------------------------------------------------

    def create_institution(
        self, actor: Authority, name: str, region: str | None = None, context: RequestContext = NO_CONTEXT
    ) -> InstitutionInfo:
        _require(actor, Permission.INSTITUTION_MANAGE)
        name = " ".join(name.split())
        if not 1 <= len(name) <= 200:  # noqa: PLR2004  # the column's length
            raise InvalidInput("an institution name has 1 to 200 characters")
        region = region or self.settings.region
        if region != self.settings.region:
            # DESIGN.md §8: each region is its own deployment; an institution lives in one.
            raise Conflict(
                "region_mismatch", f"this deployment serves region {self.settings.region!r}, not {region!r}"
            )
        now = self.clock.now()
        row = Institution(
            id=new_id(),
            name=name,
            region=region,
            created_at=now,
            idle_timeout_minutes=15,
            mfa_required_admins=True,
            mfa_required_everyone=False,
            password_min_length=12,
            require_uppercase=False,
            require_lowercase=False,
            require_digit=False,
            require_symbol=False,
        )
        try:
            with self.db.transaction() as session:
                session.add(row)
                session.flush()
                self._audit(
                    session,
                    AuditAction.INSTITUTION_CREATE,
                    actor,
                    Target("institution", row.id),
                    context,
                    now,
                    institution_id=row.id,
                )
        except IntegrityError:
            raise Conflict("institution_exists", "an institution with this name exists") from None
        return _institution_info(row)

    def list_institutions(self, actor: Authority) -> list[InstitutionInfo]:
        _require(actor, Permission.INSTITUTION_MANAGE)
        with self.db.transaction() as session:
            rows = session.scalars(select(Institution).order_by(Institution.name)).all()
            return [_institution_info(row) for row in rows if _in_scope(actor, row.id)]

    def get_institution(self, actor: Authority, institution_id: str) -> InstitutionInfo:
        _require(actor, Permission.INSTITUTION_MANAGE)
        with self.db.transaction() as session:
            return _institution_info(self._institution_in_scope(session, actor, institution_id))

    def institution_settings(self, actor: Authority, institution_id: str) -> InstitutionSettings:
        _require(actor, Permission.INSTITUTION_CONFIGURE)
        with self.db.transaction() as session:
            return _settings_of(self._institution_in_scope(session, actor, institution_id))

    def update_institution_settings(
        self,
        actor: Authority,
        institution_id: str,
        change: SettingsChange,
        context: RequestContext = NO_CONTEXT,
    ) -> InstitutionSettings:
        _require(actor, Permission.INSTITUTION_CONFIGURE)
        if change.idle_timeout_minutes is not None and not 5 <= change.idle_timeout_minutes <= 60:  # noqa: PLR2004
            raise InvalidInput("the idle timeout is 5 to 60 minutes")
        if change.password_min_length is not None and not (
            MIN_POLICY_LENGTH <= change.password_min_length <= MAX_POLICY_LENGTH
        ):
            raise InvalidInput(f"the minimum password length is {MIN_POLICY_LENGTH} to {MAX_POLICY_LENGTH}")
        now = self.clock.now()
        with self.db.transaction() as session:
            row = self._institution_in_scope(session, actor, institution_id, for_update=True)
            for field, value in _fields(change):
                if value is not None:
                    setattr(row, field, value)
            self._audit(
                session,
                AuditAction.INSTITUTION_UPDATE,
                actor,
                Target("institution", row.id),
                context,
                now,
                institution_id=row.id,
            )
            return _settings_of(row)

    def _institution_in_scope(
        self, session: Session, actor: Authority, institution_id: str, *, for_update: bool = False
    ) -> Institution:
        row = session.get(Institution, institution_id, with_for_update=for_update)
        if row is None or not _in_scope(actor, row.id):
            raise NotFound
        return row

    # -- users --------------------------------------------------------------------------

    def create_user(  # the new account's fields, named at every call site
        self,
        actor: Authority,
        *,
        institution_id: str | None,
        email: str,
        role: Role,
        password: str | None,
        must_change_password: bool = False,
        context: RequestContext = NO_CONTEXT,
    ) -> tuple[UserInfo, str | None]:
        """Create a user; without ``password``, a one-time password is generated and
        returned, to be changed at first sign-in.
        """
        _require(actor, Permission.USER_MANAGE)
        if isinstance(actor, Principal):
            if role not in (Role.INSTITUTION_ADMIN, Role.CLINICIAN, Role.AUDITOR):
                raise Forbidden("institution admins create admins, clinicians and auditors")
            institution_id = actor.institution_id
        if role not in USER_ROLES:
            raise InvalidInput("devices are enrolled with activation codes, not created as users")
        if (role in PLATFORM_ROLES) != (institution_id is None):
            raise InvalidInput("operators belong to no institution; every other role to one")
        address, key = normalise_email(email)
        generated = None
        if password is None:
            generated = password = one_time_password()
            must_change_password = True
        password = normalise(password)
        with self.db.transaction() as session:
            institution = None
            if institution_id is not None:
                institution = self._institution_in_scope(session, actor, institution_id)
            self._check_policy(password, address, institution)
        encoded = self.hasher.hash(password)
        now = self.clock.now()
        user = User(
            id=new_id(),
            institution_id=institution_id,
            email=address,
            email_key=key,
            role=role.value,
            password_hash=encoded,
            password_changed_at=now,
            must_change_password=must_change_password,
            created_at=now,
            disabled_at=None,
        )
        try:
            with self.db.transaction() as session:
                session.add(user)
                session.flush()
                self._audit(
                    session,
                    AuditAction.USER_CREATE,
                    actor,
                    Target("user", user.id),
                    context,
                    now,
                    institution_id=institution_id,
                )
        except IntegrityError:
            raise Conflict("email_taken", "a user with this e-mail address exists") from None
        return _user_info(user), generated

    def list_users(self, actor: Authority, institution_id: str | None = None) -> list[UserInfo]:
        _require(actor, Permission.USER_MANAGE)
        if isinstance(actor, Principal):
            institution_id = actor.institution_id
        query = select(User).order_by(User.email_key)
        if institution_id is not None:
            query = query.where(User.institution_id == institution_id)
        with self.db.transaction() as session:
            return [_user_info(user) for user in session.scalars(query)]

    def get_user(self, actor: Authority, user_id: str) -> UserInfo:
        _require(actor, Permission.USER_MANAGE)
        with self.db.transaction() as session:
            return _user_info(self._user_in_scope(session, actor, user_id))

    def find_user(self, actor: SystemSubject, id_or_email: str) -> UserInfo:
        """A user by id or e-mail address, for the CLI."""
        with self.db.transaction() as session:
            user = (
                session.get(User, id_or_email)
                or session.scalars(select(User).where(User.email_key == id_or_email.strip().lower())).first()
            )
            if user is None:
                raise NotFound
            return _user_info(self._user_in_scope(session, actor, user.id))

    def set_user_disabled(
        self, actor: Authority, user_id: str, *, disabled: bool, context: RequestContext = NO_CONTEXT
    ) -> UserInfo:
        _require(actor, Permission.USER_MANAGE)
        now = self.clock.now()
        with self.db.transaction() as session:
            user = self._user_in_scope(session, actor, user_id, for_update=True)
            self._refuse_self(actor, user)
            if disabled and user.disabled_at is None:
                user.disabled_at = now
                self._audit(
                    session,
                    AuditAction.USER_DISABLE,
                    actor,
                    Target("user", user.id),
                    context,
                    now,
                    institution_id=user.institution_id,
                )
                self._end_sessions(session, user.id, "user_disabled", actor, context, now)
            elif not disabled and user.disabled_at is not None:
                user.disabled_at = None
                self._audit(
                    session,
                    AuditAction.USER_ENABLE,
                    actor,
                    Target("user", user.id),
                    context,
                    now,
                    institution_id=user.institution_id,
                )
            return _user_info(user)

    def end_user_sessions(self, actor: Authority, user_id: str, context: RequestContext = NO_CONTEXT) -> int:
        """An administrator ends every session of a user (ASVS 7.4.5); returns how many."""
        _require(actor, Permission.USER_MANAGE)
        now = self.clock.now()
        with self.db.transaction() as session:
            user = self._user_in_scope(session, actor, user_id)
            return self._end_sessions(session, user.id, "ended_by_admin", actor, context, now)

    def issue_one_time_password(
        self, actor: Authority, user_id: str, context: RequestContext = NO_CONTEXT
    ) -> tuple[UserInfo, str]:
        """Replace a user's password with a new one-time password (to be changed at first
        sign-in, within ``PHIVAULT_ONE_TIME_PASSWORD_HOURS``); their sessions end. Returns it.
        """
        _require(actor, Permission.USER_MANAGE)
        password = one_time_password()
        encoded = self.hasher.hash(password)
        now = self.clock.now()
        with self.db.transaction() as session:
            user = self._user_in_scope(session, actor, user_id, for_update=True)
            self._refuse_self(actor, user)
            user.password_hash = encoded
            user.password_changed_at = now
            user.must_change_password = True
            self._audit(
                session,
                AuditAction.PASSWORD_RESET,
                actor,
                Target("user", user.id),
                context,
                now,
                institution_id=user.institution_id,
            )
            self._end_sessions(session, user.id, "password_reset", actor, context, now)
            return _user_info(user), password

    def change_role(
        self, actor: Authority, user_id: str, role: Role, context: RequestContext = NO_CONTEXT
    ) -> UserInfo:
        _require(actor, Permission.USER_MANAGE)
        now = self.clock.now()
        with self.db.transaction() as session:
            user = self._user_in_scope(session, actor, user_id, for_update=True)
            self._refuse_self(actor, user)
            current = Role(user.role)
            allowed = {Role.INSTITUTION_ADMIN, Role.CLINICIAN, Role.AUDITOR}
            if current not in allowed or role not in allowed:
                raise Forbidden("roles change among institution_admin, clinician and auditor")
            if current != role:
                user.role = role.value
                # Permissions are read from the user's row on every request: the change
                # applies to existing sessions at once (ASVS 8.3.2).
                self._audit(
                    session,
                    AuditAction.USER_ROLE_CHANGE,
                    actor,
                    Target("user", user.id),
                    context,
                    now,
                    institution_id=user.institution_id,
                )
            return _user_info(user)

    def _user_in_scope(
        self, session: Session, actor: Authority, user_id: str, *, for_update: bool = False
    ) -> User:
        user = session.get(User, user_id, with_for_update=for_update)
        if user is None or not _in_scope(actor, user.institution_id):
            raise NotFound
        if isinstance(actor, Principal) and user.institution_id is None:
            raise NotFound  # platform operators are not managed through an institution
        return user

    @staticmethod
    def _refuse_self(actor: Authority, user: User) -> None:
        if isinstance(actor, Principal) and actor.user_id == user.id:
            raise Conflict("own_account", "administrators cannot disable or re-role themselves")

    def _check_policy(self, password: str, email: str, institution: Institution | None) -> None:
        words = (institution.name,) if institution is not None else ()
        reasons = policy_violations(_policy_of(institution), password, email=email, context_words=words)
        if reasons:
            raise PasswordRejected(reasons)

    def ensure_bootstrap_operator(self) -> tuple[str, str] | None:
        """On an empty database, create the platform operator with a one-time password.

        Returns (e-mail, password) when it created one. Replicas starting together create
        one operator: the e-mail is unique, and the loser's insert fails.
        """
        with self.db.transaction() as session:
            if session.scalar(select(User.id).limit(1)) is not None:
                return None
        email = self.settings.bootstrap_operator_email
        address, key = normalise_email(email)
        password = one_time_password()
        encoded = self.hasher.hash(password)
        now = self.clock.now()
        try:
            with self.db.transaction() as session:
                if session.scalar(select(User.id).limit(1)) is not None:
                    return None
                user = User(
                    id=new_id(),
                    institution_id=None,
                    email=address,
                    email_key=key,
                    role=Role.OPERATOR.value,
                    password_hash=encoded,
                    password_changed_at=now,
                    must_change_password=True,
                    created_at=now,
                    disabled_at=None,
                )
                session.add(user)
                session.flush()
                self._audit(
                    session,
                    AuditAction.USER_CREATE,
                    SystemSubject(Actor.system("bootstrap")),
                    Target("user", user.id),
                    NO_CONTEXT,
                    now,
                )
        except IntegrityError:
            return None
        return address, password

    # -- sign-in ------------------------------------------------------------------------

    def login(self, email: str, password: str, context: RequestContext = NO_CONTEXT) -> TokenPair:
        """Check e-mail and password; return tokens, or raise ``MfaRequired`` with a token
        for the second step. Unknown e-mail, wrong password, disabled or locked account:
        one answer, ``InvalidCredentials``, after the same work (ASVS 6.3.8).
        """
        # A burst of sign-ins waits here, not in the thread pool's Python code: dozens of
        # threads contending for the GIL and the database would stall the event loop.
        with _SIGN_IN_GATE:
            return self._login(email, password, context)

    def _login(self, email: str, password: str, context: RequestContext) -> TokenPair:
        now = self.clock.now()
        client = context.ip or "unknown"
        try:
            _, key = normalise_email(email)
        except InvalidInput:
            key = email.strip().lower()[:MAX_EMAIL]
        password = normalise(password)
        with self.db.transaction() as session:
            client_state = throttle.state(session, throttle.CLIENT, client, now)
            account_state = throttle.state(session, throttle.ACCOUNT, key, now)
            user = session.scalars(select(User).where(User.email_key == key)).first()
        if client_state.locked(now):
            assert client_state.locked_until is not None  # noqa: S101  # nosec B101  # locked() says so
            raise Throttled(int((client_state.locked_until - now).total_seconds()) + 1)
        encoded = user.password_hash if user is not None else None
        matched = self._verify(encoded, password)
        usable = matched and user is not None and user.disabled_at is None and not account_state.locked(now)
        new_hash = None
        if usable and encoded is not None and self.hasher.needs_rehash(encoded):
            new_hash = self.hasher.hash(password)
        outcome: TokenPair | AccountsError
        with self.db.transaction() as session:
            fresh = session.get(User, user.id, with_for_update=True) if user is not None else None
            if not usable or fresh is None or fresh.password_hash != encoded or fresh.disabled_at is not None:
                locked = account_state.locked(now)
                self._count_failure(session, key, client, fresh, context, now, locked=locked)
                outcome = InvalidCredentials()
            else:
                throttle.clear(session, throttle.ACCOUNT, key)
                if new_hash is not None:
                    fresh.password_hash = new_hash
                outcome = self._password_accepted(session, fresh, context, now)
        if isinstance(outcome, AccountsError):
            raise outcome
        return outcome

    def _verify(self, encoded: str | None, password: str) -> bool:
        if too_long(password):
            encoded = None
        if encoded is None:
            # Same work for an unknown user as for a wrong password (ASVS 6.3.8).
            self.hasher.verify(self._dummy(), password[:64])
            return False
        return self.hasher.verify(encoded, password)

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self.hasher.hash(new_token())
        return self._dummy_hash

    def _count_failure(  # noqa: PLR0913
        self,
        session: Session,
        key: str,
        client: str,
        user: User | None,
        context: RequestContext,
        now: datetime,
        *,
        locked: bool,
        action: AuditAction = AuditAction.AUTH_LOGIN,
    ) -> None:
        account = throttle.record_failure(session, throttle.ACCOUNT, key, now)
        throttle.record_failure(session, throttle.CLIENT, client, now)
        target = Target("user", user.id) if user is not None else None
        institution_id = user.institution_id if user is not None else None
        outcome = Outcome.DENIED if locked else Outcome.FAILURE
        self._audit(
            session, action, _ANONYMOUS, target, context, now, outcome=outcome, institution_id=institution_id
        )
        if account.lock_started:
            self._audit(
                session,
                AuditAction.AUTH_LOCKOUT,
                _ANONYMOUS,
                target,
                context,
                now,
                outcome=Outcome.DENIED,
                institution_id=institution_id,
            )

    def _password_accepted(
        self, session: Session, user: User, context: RequestContext, now: datetime
    ) -> TokenPair | AccountsError:
        refusal = self._sign_in_refusal(session, user, context, now)
        if refusal is not None:
            return refusal
        if user.totp_enabled_at is not None:
            token = new_token()
            session.add(
                MfaChallenge(
                    digest=token_digest(token),
                    user_id=user.id,
                    created_at=now,
                    expires_at=now + MFA_CHALLENGE_TTL,
                    attempts=0,
                    used_at=None,
                )
            )
            return MfaRequired(token, int(MFA_CHALLENGE_TTL.total_seconds()))
        return self._start_session(session, user, context, now, authenticated_at=now, mfa_at=None)

    def _sign_in_refusal(
        self, session: Session, user: User, context: RequestContext, now: datetime
    ) -> AccountsError | None:
        """Checks after the credentials are right: the region, and the admin networks."""
        subject = SystemSubject(Actor(ActorType.USER, user.id), user.institution_id)
        institution = session.get(Institution, user.institution_id) if user.institution_id else None
        refusal: AccountsError | None = None
        if institution is not None and institution.region != self.settings.region:
            refusal = Conflict("region_mismatch", "this institution is served in another region")
        elif Role(user.role) in ADMIN_ROLES and not self.admin_address(context.ip):
            refusal = IpNotAllowed()
        elif user.must_change_password and now - user.password_changed_at >= timedelta(
            hours=self.settings.one_time_password_hours
        ):
            refusal = OneTimePasswordExpired()  # NIST SP 800-63B §6.1.2.1: temporary secrets expire
        if refusal is not None:
            self._audit(
                session,
                AuditAction.AUTH_LOGIN,
                subject,
                Target("user", user.id),
                context,
                now,
                outcome=Outcome.DENIED,
            )
        return refusal

    def admin_address(self, ip: str | None) -> bool:
        """Whether ``ip`` is inside ``PHIVAULT_ADMIN_ALLOW_CIDRS``."""
        if ip is None:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.settings.admin_allow_cidrs)

    def verify_mfa(self, mfa_token: str, code: str, context: RequestContext = NO_CONTEXT) -> TokenPair:
        """The second step of sign-in: a TOTP code or an unused recovery code."""
        now = self.clock.now()
        client = context.ip or "unknown"
        outcome: TokenPair | AccountsError
        with self.db.transaction() as session:
            client_state = throttle.state(session, throttle.CLIENT, client, now)
            if client_state.locked(now) and client_state.locked_until is not None:
                raise Throttled(int((client_state.locked_until - now).total_seconds()) + 1)
            challenge = (
                session.get(MfaChallenge, token_digest(mfa_token), with_for_update=True)
                if len(mfa_token) <= MAX_TOKEN_LENGTH
                else None
            )
            user = session.get(User, challenge.user_id, with_for_update=True) if challenge else None
            if (
                challenge is None
                or user is None
                or challenge.used_at is not None
                or challenge.expires_at <= now
                or challenge.attempts >= MFA_CHALLENGE_ATTEMPTS
                or user.disabled_at is not None
                or user.totp_enabled_at is None
            ):
                outcome = InvalidMfaToken()
            else:
                outcome = self._check_second_factor(session, challenge, user, code, context, now)
        if isinstance(outcome, AccountsError):
            raise outcome
        return outcome

    def _check_second_factor(
        self,
        session: Session,
        challenge: MfaChallenge,
        user: User,
        code: str,
        context: RequestContext,
        now: datetime,
    ) -> TokenPair | AccountsError:
        subject = SystemSubject(Actor(ActorType.USER, user.id), user.institution_id)
        locked = throttle.state(session, throttle.ACCOUNT, user.email_key, now).locked(now)
        accepted = False
        method = "totp"
        if not locked and mfa.looks_like_totp(code) and user.totp_secret is not None:
            seed = self.secrets.open(
                session, user.totp_secret, purpose="totp", owner=user.id, now=now
            ).decode()
            step = mfa.accepted_step(seed, code, now, user.totp_last_step)
            if step is not None:
                user.totp_last_step = step
                accepted = True
        elif not locked and len(code) <= MAX_TOKEN_LENGTH:
            method = "recovery_code"
            recovery = session.get(RecoveryCode, mfa.recovery_digest(code), with_for_update=True)
            if recovery is not None and recovery.user_id == user.id and recovery.used_at is None:
                recovery.used_at = now
                accepted = True
        if not accepted:
            challenge.attempts += 1
            self._count_failure(
                session,
                user.email_key,
                context.ip or "unknown",
                user,
                context,
                now,
                locked=locked,
                action=AuditAction.AUTH_MFA,
            )
            return InvalidMfaCode()
        challenge.used_at = now
        throttle.clear(session, throttle.ACCOUNT, user.email_key)
        self._audit(session, AuditAction.AUTH_MFA, subject, Target(method, user.id), context, now)
        refusal = self._sign_in_refusal(session, user, context, now)
        if refusal is not None:
            return refusal
        return self._start_session(
            session, user, context, now, authenticated_at=challenge.created_at, mfa_at=now
        )

    def _start_session(
        self,
        session: Session,
        user: User,
        context: RequestContext,
        now: datetime,
        *,
        authenticated_at: datetime,
        mfa_at: datetime | None,
    ) -> TokenPair:
        # Sessions that ended over a day ago (and their tokens) are of no further use.
        session.execute(
            delete(AuthSession).where(
                AuthSession.user_id == user.id, AuthSession.expires_at < now - timedelta(days=1)
            )
        )
        active = session.scalars(
            select(AuthSession)
            .where(
                AuthSession.user_id == user.id, AuthSession.revoked_at.is_(None), AuthSession.expires_at > now
            )
            .order_by(AuthSession.created_at)
        ).all()
        subject = SystemSubject(Actor(ActorType.USER, user.id), user.institution_id)
        # ASVS 7.1.2: at most max_sessions_per_user; the oldest ends to make room.
        for oldest in active[: max(0, len(active) - self.settings.max_sessions_per_user + 1)]:
            self._end_session(session, oldest, "session_limit", subject, context, now)
        auth_session = AuthSession(
            id=new_id(),
            user_id=user.id,
            institution_id=user.institution_id,
            created_at=now,
            last_seen_at=now,
            expires_at=now + self.absolute_lifetime,
            authenticated_at=authenticated_at,
            mfa_at=mfa_at,
            revoked_at=None,
            revoke_reason=None,
            ip=context.ip,
            user_agent=context.user_agent[:256] if context.user_agent else None,
        )
        session.add(auth_session)
        session.flush()
        self._audit(
            session, AuditAction.AUTH_LOGIN, subject, Target("session", auth_session.id), context, now
        )
        return self._issue_tokens(session, auth_session, now)

    def _issue_tokens(self, session: Session, auth_session: AuthSession, now: datetime) -> TokenPair:
        access, refresh = new_token(), new_token()
        session.add(
            AccessToken(
                digest=token_digest(access), session_id=auth_session.id, expires_at=now + self.access_ttl
            )
        )
        session.add(
            RefreshToken(
                digest=token_digest(refresh), session_id=auth_session.id, created_at=now, used_at=None
            )
        )
        return TokenPair(access, refresh, int(self.access_ttl.total_seconds()), auth_session.id)

    def refresh(self, refresh_token: str, context: RequestContext = NO_CONTEXT) -> TokenPair:
        """Exchange a refresh token for a new pair. The token is spent; presenting a spent
        one again ends its whole session (RFC 9700 §4.14.2: reuse means theft).
        """
        now = self.clock.now()
        if len(refresh_token) > MAX_TOKEN_LENGTH:
            raise InvalidGrant
        outcome: TokenPair | AccountsError = InvalidGrant()
        with self.db.transaction() as session:
            token = session.get(RefreshToken, token_digest(refresh_token))
            if token is not None:
                outcome = self._rotate(session, token, context, now)
        if isinstance(outcome, AccountsError):
            raise outcome
        return outcome

    def _rotate(
        self, session: Session, token: RefreshToken, context: RequestContext, now: datetime
    ) -> TokenPair | AccountsError:
        auth_session = session.get(AuthSession, token.session_id, with_for_update=True)
        user = session.get(User, auth_session.user_id) if auth_session else None
        if auth_session is None or user is None:
            return InvalidGrant()
        spent = token.used_at is not None
        if not spent:
            claimed = session.execute(
                update(RefreshToken)
                .where(RefreshToken.digest == token.digest, RefreshToken.used_at.is_(None))
                .values(used_at=now)
                .execution_options(synchronize_session=False)
            )
            spent = claimed.rowcount != 1  # type: ignore[attr-defined]  # a concurrent exchange won
        if spent:
            self._audit(
                session,
                AuditAction.AUTH_TOKEN_REUSE,
                _ANONYMOUS,
                Target("session", auth_session.id),
                context,
                now,
                outcome=Outcome.DENIED,
                institution_id=user.institution_id,
            )
            if auth_session.revoked_at is None:
                self._end_session(session, auth_session, "refresh_token_reuse", _ANONYMOUS, context, now)
            return InvalidGrant()
        if auth_session.revoked_at is not None or user.disabled_at is not None:
            return InvalidGrant()
        institution = session.get(Institution, user.institution_id) if user.institution_id else None
        ended = self._session_over(auth_session, institution, now)
        if ended is not None:
            self._end_session(session, auth_session, ended, _TIMEOUTS, context, now)
            return InvalidGrant()
        if Role(user.role) in ADMIN_ROLES and not self.admin_address(context.ip):
            return IpNotAllowed()
        auth_session.last_seen_at = now
        session.execute(
            delete(AccessToken).where(AccessToken.session_id == auth_session.id, AccessToken.expires_at < now)
        )
        return self._issue_tokens(session, auth_session, now)

    def _idle_timeout(self, institution: Institution | None) -> timedelta:
        minutes = institution.idle_timeout_minutes if institution else self.settings.operator_idle_minutes
        return timedelta(minutes=minutes)

    def _session_over(
        self, auth_session: AuthSession, institution: Institution | None, now: datetime
    ) -> str | None:
        if now >= auth_session.expires_at:
            return "expired"
        if now - auth_session.last_seen_at > self._idle_timeout(institution):
            return "idle_timeout"
        return None

    # -- requests -----------------------------------------------------------------------

    def authenticate(self, access_token: str, context: RequestContext = NO_CONTEXT) -> Authentication:
        """Resolve a bearer token to its principal, or raise ``Unauthenticated``.

        The session's idle and absolute limits are checked here, on every request, so a
        session that went quiet ends on whichever replica sees it next.
        """
        if not access_token or len(access_token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated
        now = self.clock.now()
        ended = False
        with self.db.transaction() as session:
            row = session.execute(
                select(AccessToken, AuthSession, User)
                .join(AuthSession, AccessToken.session_id == AuthSession.id)
                .join(User, AuthSession.user_id == User.id)
                .where(AccessToken.digest == token_digest(access_token))
            ).first()
            if row is None:
                raise Unauthenticated
            token, auth_session, user = row
            if token.expires_at <= now or auth_session.revoked_at is not None or user.disabled_at is not None:
                raise Unauthenticated
            institution = session.get(Institution, user.institution_id) if user.institution_id else None
            reason = self._session_over(auth_session, institution, now)
            if reason is not None:
                self._end_session(session, auth_session, reason, _TIMEOUTS, context, now)
                ended = True
            elif now - auth_session.last_seen_at >= TOUCH_INTERVAL:
                auth_session.last_seen_at = now
            pending = self._pending(user, institution)
        if ended:
            raise Unauthenticated("the session has ended; sign in again")
        role = Role(user.role)
        if role in ADMIN_ROLES and not self.admin_address(context.ip):
            raise IpNotAllowed
        return Authentication(
            Principal.for_user(user.id, user.institution_id, role, auth_session.id), pending
        )

    def _pending(self, user: User, institution: Institution | None) -> frozenset[str]:
        pending = set()
        if user.must_change_password:
            pending.add(PENDING_PASSWORD_CHANGE)
        if user.totp_enabled_at is None and self.mfa_required(Role(user.role), institution):
            pending.add(PENDING_MFA_ENROLMENT)
        return frozenset(pending)

    @staticmethod
    def mfa_required(role: Role, institution: Institution | None) -> bool:
        if role is Role.DEVICE:
            return False
        if role in PLATFORM_ROLES or institution is None:
            return True
        if role in ADMIN_ROLES:
            return institution.mfa_required_admins or institution.mfa_required_everyone
        return institution.mfa_required_everyone

    def logout(self, principal: Principal, context: RequestContext = NO_CONTEXT) -> None:
        now = self.clock.now()
        with self.db.transaction() as session:
            auth_session = self._own_session(session, principal)
            if auth_session.revoked_at is None:
                self._end_session(session, auth_session, "logout", principal, context, now)

    def list_sessions(self, principal: Principal) -> list[SessionInfo]:
        now = self.clock.now()
        with self.db.transaction() as session:
            rows = session.scalars(
                select(AuthSession)
                .where(
                    AuthSession.user_id == principal.user_id,
                    AuthSession.revoked_at.is_(None),
                    AuthSession.expires_at > now,
                )
                .order_by(AuthSession.created_at)
            ).all()
            return [
                SessionInfo(
                    id=row.id,
                    created_at=row.created_at,
                    last_seen_at=row.last_seen_at,
                    expires_at=row.expires_at,
                    ip=row.ip,
                    user_agent=row.user_agent,
                    current=row.id == principal.session_id,
                )
                for row in rows
            ]

    def end_own_session(
        self, principal: Principal, session_id: str, context: RequestContext = NO_CONTEXT
    ) -> None:
        now = self.clock.now()
        with self.db.transaction() as session:
            row = session.get(AuthSession, session_id, with_for_update=True)
            if row is None or row.user_id != principal.user_id or row.revoked_at is not None:
                raise NotFound
            self._end_session(session, row, "ended_by_user", principal, context, now)

    def _own_session(self, session: Session, principal: Principal) -> AuthSession:
        row = (
            session.get(AuthSession, principal.session_id, with_for_update=True)
            if principal.session_id
            else None
        )
        if row is None or row.user_id != principal.user_id:
            raise Unauthenticated
        return row

    def _end_session(
        self,
        session: Session,
        auth_session: AuthSession,
        reason: str,
        subject: Subject,
        context: RequestContext,
        now: datetime,
    ) -> None:
        auth_session.revoked_at = now
        auth_session.revoke_reason = reason
        session.execute(delete(AccessToken).where(AccessToken.session_id == auth_session.id))
        self._audit(
            session,
            AuditAction.SESSION_END,
            subject,
            Target("session", auth_session.id),
            context,
            now,
            institution_id=auth_session.institution_id,
        )

    def _end_sessions(
        self,
        session: Session,
        user_id: str,
        reason: str,
        subject: Subject,
        context: RequestContext,
        now: datetime,
        *,
        keep: str | None = None,
    ) -> int:
        rows = session.scalars(
            select(AuthSession).where(
                AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None), AuthSession.expires_at > now
            )
        ).all()
        ended = 0
        for row in rows:
            if row.id != keep:
                self._end_session(session, row, reason, subject, context, now)
                ended += 1
        return ended

    # -- a signed-in user's own account -------------------------------------------------

    def me(self, principal: Principal) -> UserInfo:
        with self.db.transaction() as session:
            user = session.get(User, principal.user_id)
            if user is None:
                raise Unauthenticated
            return _user_info(user)

    def reauthenticate(
        self, principal: Principal, password: str, context: RequestContext = NO_CONTEXT
    ) -> None:
        """Confirm the password again: sensitive changes need one within
        ``PHIVAULT_REAUTH_MINUTES`` (ASVS 7.5.1).
        """
        now = self.clock.now()
        self._check_own_password(principal, password, context, action=AuditAction.AUTH_REAUTHENTICATE)
        with self.db.transaction() as session:
            self._own_session(session, principal).authenticated_at = now
            self._audit(
                session,
                AuditAction.AUTH_REAUTHENTICATE,
                principal,
                Target("session", principal.session_id or ""),
                context,
                now,
            )

    def _check_own_password(
        self, principal: Principal, password: str, context: RequestContext, *, action: AuditAction
    ) -> User:
        """Verify the signed-in user's password, throttled like sign-in; return the user."""
        now = self.clock.now()
        password = normalise(password)
        with self.db.transaction() as session:
            user = session.get(User, principal.user_id)
            if user is None:
                raise Unauthenticated
            locked = throttle.state(session, throttle.ACCOUNT, user.email_key, now).locked(now)
        if self._verify(user.password_hash, password) and not locked:
            with self.db.transaction() as session:
                throttle.clear(session, throttle.ACCOUNT, user.email_key)
            return user
        with self.db.transaction() as session:
            throttle.record_failure(session, throttle.ACCOUNT, user.email_key, now)
            self._audit(
                session,
                action,
                principal,
                Target("user", user.id),
                context,
                now,
                outcome=Outcome.DENIED if locked else Outcome.FAILURE,
            )
        raise WrongPassword

    def _require_recent_authentication(
        self, session: Session, principal: Principal, now: datetime
    ) -> AuthSession:
        auth_session = self._own_session(session, principal)
        if now - auth_session.authenticated_at > self.reauth_window:
            raise ReauthenticationRequired
        return auth_session

    def change_password(
        self, principal: Principal, current: str, new: str, context: RequestContext = NO_CONTEXT
    ) -> None:
        """Needs the current password (ASVS 6.2.3); ends the user's other sessions."""
        user = self._check_own_password(principal, current, context, action=AuditAction.PASSWORD_CHANGE)
        new = normalise(new)
        with self.db.transaction() as session:
            institution = session.get(Institution, user.institution_id) if user.institution_id else None
            self._check_policy(new, user.email, institution)
        if self.hasher.verify(user.password_hash, new):
            raise PasswordRejected(["same_as_current"])
        encoded = self.hasher.hash(new)
        now = self.clock.now()
        with self.db.transaction() as session:
            row = session.get(User, user.id, with_for_update=True)
            if row is None:
                raise Unauthenticated
            row.password_hash = encoded
            row.password_changed_at = now
            row.must_change_password = False
            self._own_session(session, principal).authenticated_at = now
            self._audit(session, AuditAction.PASSWORD_CHANGE, principal, Target("user", row.id), context, now)
            self._end_sessions(
                session, row.id, "password_change", principal, context, now, keep=principal.session_id
            )

    def change_email(
        self, principal: Principal, email: str, context: RequestContext = NO_CONTEXT
    ) -> UserInfo:
        address, key = normalise_email(email)
        now = self.clock.now()
        try:
            with self.db.transaction() as session:
                self._require_recent_authentication(session, principal, now)
                user = session.get(User, principal.user_id, with_for_update=True)
                if user is None:
                    raise Unauthenticated
                user.email, user.email_key = address, key
                session.flush()
                self._audit(
                    session, AuditAction.USER_EMAIL_CHANGE, principal, Target("user", user.id), context, now
                )
                return _user_info(user)
        except IntegrityError:
            raise Conflict("email_taken", "a user with this e-mail address exists") from None

    def begin_totp(self, principal: Principal, context: RequestContext = NO_CONTEXT) -> TotpEnrolment:
        """Start TOTP enrolment: a new seed, shown once, confirmed by ``confirm_totp``."""
        del context
        now = self.clock.now()
        seed = mfa.new_seed()
        with self.db.transaction() as session:
            self._require_recent_authentication(session, principal, now)
            user = session.get(User, principal.user_id, with_for_update=True)
            if user is None:
                raise Unauthenticated
            if user.totp_enabled_at is not None:
                raise Conflict("mfa_already_enabled", "TOTP is already set up; disable it first")
            user.totp_pending_secret = self.secrets.seal(
                session, seed.encode(), purpose="totp-pending", owner=user.id, now=now
            )
            uri = mfa.provisioning_uri(seed, user.email)
        return TotpEnrolment(secret=seed, otpauth_uri=uri, qr_code=mfa.qr_data_uri(uri))

    def confirm_totp(
        self, principal: Principal, code: str, context: RequestContext = NO_CONTEXT
    ) -> list[str]:
        """Finish enrolment with a code from the app; returns 10 recovery codes, shown once."""
        now = self.clock.now()
        with self.db.transaction() as session:
            auth_session = self._require_recent_authentication(session, principal, now)
            user = session.get(User, principal.user_id, with_for_update=True)
            if user is None:
                raise Unauthenticated
            if user.totp_enabled_at is not None or user.totp_pending_secret is None:
                raise Conflict("no_mfa_enrolment", "start TOTP enrolment first")
            seed = self.secrets.open(
                session, user.totp_pending_secret, purpose="totp-pending", owner=user.id, now=now
            )
            step = mfa.accepted_step(seed.decode(), code, now, None)
            if step is None:
                raise CodeRejected
            user.totp_secret = self.secrets.seal(session, seed, purpose="totp", owner=user.id, now=now)
            user.totp_pending_secret = None
            user.totp_enabled_at = now
            user.totp_last_step = step
            codes = self._replace_recovery_codes(session, user.id, now)
            auth_session.mfa_at = now
            self._audit(session, AuditAction.MFA_ENABLE, principal, Target("user", user.id), context, now)
            self._end_sessions(
                session, user.id, "mfa_change", principal, context, now, keep=principal.session_id
            )
            return codes

    def disable_totp(self, principal: Principal, context: RequestContext = NO_CONTEXT) -> None:
        now = self.clock.now()
        with self.db.transaction() as session:
            self._require_recent_authentication(session, principal, now)
            user = session.get(User, principal.user_id, with_for_update=True)
            if user is None:
                raise Unauthenticated
            if user.totp_enabled_at is None:
                raise Conflict("mfa_not_enabled", "TOTP is not set up")
            institution = session.get(Institution, user.institution_id) if user.institution_id else None
            if self.mfa_required(Role(user.role), institution):
                raise Conflict("mfa_required_by_policy", "your institution requires MFA for your role")
            user.totp_secret = user.totp_pending_secret = None
            user.totp_enabled_at = None
            user.totp_last_step = None
            session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
            self._audit(session, AuditAction.MFA_DISABLE, principal, Target("user", user.id), context, now)
            self._end_sessions(
                session, user.id, "mfa_change", principal, context, now, keep=principal.session_id
            )

    def regenerate_recovery_codes(
        self, principal: Principal, context: RequestContext = NO_CONTEXT
    ) -> list[str]:
        now = self.clock.now()
        with self.db.transaction() as session:
            self._require_recent_authentication(session, principal, now)
            user = session.get(User, principal.user_id, with_for_update=True)
            if user is None or user.totp_enabled_at is None:
                raise Conflict("mfa_not_enabled", "TOTP is not set up")
            codes = self._replace_recovery_codes(session, user.id, now)
            self._audit(
                session, AuditAction.MFA_RECOVERY_CODES, principal, Target("user", user.id), context, now
            )
            return codes

    @staticmethod
    def _replace_recovery_codes(session: Session, user_id: str, now: datetime) -> list[str]:
        session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
        codes = mfa.new_recovery_codes()
        for code in codes:
            session.add(
                RecoveryCode(digest=mfa.recovery_digest(code), user_id=user_id, created_at=now, used_at=None)
            )
        return codes

    # -- password reset -----------------------------------------------------------------

    def request_password_reset(self, email: str, context: RequestContext = NO_CONTEXT) -> None:
        """Queue a reset e-mail if the address belongs to an enabled user. The caller
        answers the same either way (ASVS 6.3.8); at most three e-mails an hour go to one
        address, and one client may ask twenty times an hour.
        """
        now = self.clock.now()
        client = context.ip or "unknown"
        try:
            _, key = normalise_email(email)
        except InvalidInput:
            key = None
        with self.db.transaction() as session:
            client_state = throttle.state(session, throttle.RESET_CLIENT, client, now)
            if client_state.locked(now) and client_state.locked_until is not None:
                raise Throttled(int((client_state.locked_until - now).total_seconds()) + 1)
            throttle.record_failure(session, throttle.RESET_CLIENT, client, now)
            user = session.scalars(select(User).where(User.email_key == key)).first() if key else None
            target = Target("user", user.id) if user is not None else None
            self._audit(
                session,
                AuditAction.PASSWORD_RESET_REQUEST,
                _ANONYMOUS,
                target,
                context,
                now,
                institution_id=user.institution_id if user else None,
            )
            if user is None or user.disabled_at is not None or key is None:
                return
            if throttle.state(session, throttle.RESET_MAIL, key, now).failures >= throttle.RESET_MAIL.free:
                return
            throttle.record_failure(session, throttle.RESET_MAIL, key, now)
            enqueue(session, RESET_MAIL_JOB, {"user_id": user.id}, now=now)

    def _send_reset_mail(self, job: JobContext) -> None:
        """Job: make a reset token and mail its link. The token exists only here and in
        the message; the database keeps its digest (so the queue never holds it).
        """
        session = job.session
        user = session.get(User, str(job.payload["user_id"]))
        if user is None or user.disabled_at is not None:
            return
        now = self.clock.now()
        session.execute(
            update(PasswordResetToken)
            .where(PasswordResetToken.user_id == user.id, PasswordResetToken.used_at.is_(None))
            .values(used_at=now)
            .execution_options(synchronize_session=False)
        )
        token = new_token()
        session.add(
            PasswordResetToken(
                digest=token_digest(token),
                user_id=user.id,
                created_at=now,
                expires_at=now + RESET_TOKEN_TTL,
                used_at=None,
            )
        )
        link = f"{self.settings.public_url.rstrip('/')}/reset-password#token={token}"
        minutes = int(RESET_TOKEN_TTL.total_seconds() // 60)
        self.mailer.send(
            user.email,
            "Reset your phivault password",
            "Someone asked to reset the password of your phivault account.\n\n"
            f"To choose a new password, open this link within {minutes} minutes:\n\n{link}\n\n"
            "The link works once. If you did not ask for this, ignore this message: your\n"
            "password stays as it is. A reset does not turn off two-factor sign-in.\n",
        )

    def confirm_password_reset(
        self, token: str, new_password: str, context: RequestContext = NO_CONTEXT
    ) -> None:
        """Set a new password with a reset token. Every session ends; MFA stays on, so
        the next sign-in still asks for the second factor (ASVS 6.4.3).
        """
        now = self.clock.now()
        digest = token_digest(token) if len(token) <= MAX_TOKEN_LENGTH else ""
        new_password = normalise(new_password)
        with self.db.transaction() as session:
            user = self._reset_user(session, digest, now)
            institution = session.get(Institution, user.institution_id) if user.institution_id else None
            self._check_policy(new_password, user.email, institution)
        encoded = self.hasher.hash(new_password)
        with self.db.transaction() as session:
            user = self._reset_user(session, digest, now, for_update=True)
            reset = session.get(PasswordResetToken, digest)
            if reset is None:
                raise InvalidResetToken
            reset.used_at = now
            user.password_hash = encoded
            user.password_changed_at = now
            user.must_change_password = False
            session.execute(delete(MfaChallenge).where(MfaChallenge.user_id == user.id))
            throttle.clear(session, throttle.ACCOUNT, user.email_key)
            subject = SystemSubject(Actor(ActorType.USER, user.id), user.institution_id)
            self._audit(session, AuditAction.PASSWORD_RESET, subject, Target("user", user.id), context, now)
            self._end_sessions(session, user.id, "password_reset", subject, context, now)

    @staticmethod
    def _reset_user(session: Session, digest: str, now: datetime, *, for_update: bool = False) -> User:
        reset = session.get(PasswordResetToken, digest, with_for_update=for_update) if digest else None
        if reset is None or reset.used_at is not None or reset.expires_at <= now:
            raise InvalidResetToken
        user = session.get(User, reset.user_id, with_for_update=for_update)
        if user is None or user.disabled_at is not None:
            raise InvalidResetToken
        return user

    # -- housekeeping -------------------------------------------------------------------

    def count_users(self) -> int:
        with self.db.transaction() as session:
            return int(session.scalar(select(func.count()).select_from(User)) or 0)

    @staticmethod
    def _audit(  # noqa: PLR0913  # the record's fields
        session: Session,
        action: AuditAction,
        subject: Subject,
        target: Target | None,
        context: RequestContext,
        now: datetime,
        *,
        outcome: Outcome = Outcome.SUCCESS,
        institution_id: str | None = None,
    ) -> None:
        record(
            session, action, subject, target, outcome, now=now, context=context, institution_id=institution_id
        )


def _fields(change: SettingsChange) -> Iterator[tuple[str, object]]:
    for field in fields(change):
        yield field.name, getattr(change, field.name)
