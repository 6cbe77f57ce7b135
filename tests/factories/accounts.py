"""Accounts for tests: institutions, users of every role, sessions and sign-in helpers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, Protocol

import pyotp

from phivault.accounts.models import User
from phivault.accounts.passwords import Argon2idHasher
from phivault.accounts.permissions import Role
from phivault.accounts.service import InstitutionInfo
from phivault.audit.service import NO_CONTEXT, Actor, SystemSubject
from phivault.ids import new_id
from phivault.runtime import Runtime
from servers import logscan

PASSWORD = "plain sailing through november"  # meets the default policy
logscan.plant(PASSWORD)
CLI = SystemSubject(Actor.system("tests"))
LOOPBACK = ("127.0.0.1", 50000)


@cache
def password_hash() -> str:
    """One Argon2id hash of ``PASSWORD`` with the default parameters, made once."""
    return Argon2idHasher(19_456, 2).hash(PASSWORD)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True, slots=True)
class Member:
    user_id: str
    email: str
    role: Role
    institution_id: str | None


class AccountsFactory:
    """Builds accounts straight through the service and the tables (fast), and signs in
    through the API (the path under test).
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def institution(self, name: str | None = None) -> InstitutionInfo:
        return self.runtime.accounts.create_institution(CLI, name or f"Institution {new_id()[:8]}")

    def member(
        self,
        role: Role,
        institution_id: str | None,
        *,
        email: str | None = None,
        mfa: bool = False,
        must_change_password: bool = False,
    ) -> Member:
        """A user row with ``PASSWORD``; any role, devices included (they have no other
        way in yet). ``mfa`` marks TOTP as set up without a seed, for tests of routes.
        """
        now = self.runtime.clock.now()
        email = email or f"{role.value}-{new_id()[:8]}@example.org"
        user = User(
            id=new_id(),
            institution_id=institution_id,
            email=email,
            email_key=email.lower(),
            role=role.value,
            password_hash=password_hash(),
            password_changed_at=now,
            must_change_password=must_change_password,
            created_at=now,
            disabled_at=None,
            totp_enabled_at=now if mfa else None,
        )
        with self.runtime.db.transaction() as session:
            session.add(user)
        return Member(user.id, email, role, institution_id)

    def session_for(self, member: Member, *, mfa: bool = False) -> tuple[str, str]:
        """(access token, session id) of a fresh session, as if signed in with MFA;
        ``mfa`` marks TOTP as set up again (a test may have switched it off).
        """
        accounts = self.runtime.accounts
        now = self.runtime.clock.now()
        with self.runtime.db.transaction() as session:
            user = session.get(User, member.user_id)
            assert user is not None
            if mfa and user.totp_enabled_at is None:
                user.totp_enabled_at = now
            pair = accounts._start_session(session, user, NO_CONTEXT, now, authenticated_at=now, mfa_at=now)
        return pair.access_token, pair.session_id


class Response(Protocol):
    """What tests read of an httpx or Starlette test-client response."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...  # noqa: ANN401


class Client(Protocol):
    def post(self, url: str, *, json: Any = None, headers: Mapping[str, str] | None = None) -> Response: ...  # noqa: ANN401


def login(client: Client, email: str, password: str = PASSWORD) -> Response:
    return client.post("/api/v1/auth/login", json={"email": email, "password": password})


def totp_code(seed: str, moment: datetime) -> str:
    return pyotp.TOTP(seed).at(moment)


def enrol_totp(client: Client, access_token: str, moment: datetime) -> tuple[str, list[str]]:
    """Set up TOTP through the API; returns (seed, recovery codes)."""
    begun = client.post("/api/v1/auth/mfa/totp", headers=bearer(access_token))
    assert begun.status_code == 200, begun.text
    seed: str = begun.json()["secret"]
    confirmed = client.post(
        "/api/v1/auth/mfa/totp/confirm", headers=bearer(access_token), json={"code": totp_code(seed, moment)}
    )
    assert confirmed.status_code == 200, confirmed.text
    codes: list[str] = confirmed.json()["recovery_codes"]
    return seed, codes


def problem(response: Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json", response.text
    body: dict[str, Any] = response.json()
    return body
