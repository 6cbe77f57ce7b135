"""Password reset by e-mail, against a real SMTP server on 127.0.0.1 (aiosmtpd)."""

from __future__ import annotations

import email
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import Message

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from fastapi.testclient import TestClient
from pydantic import SecretStr

from factories.accounts import PASSWORD, AccountsFactory, bearer, enrol_totp, login, problem
from phivault.accounts.mail import SmtpMailer
from phivault.accounts.permissions import Role
from phivault.clock import ManualClock
from phivault.runtime import Runtime
from servers import logscan
from servers.common import free_port

NEW_PASSWORD = "rivers run to the sea"
SMTP_USER, SMTP_PASSWORD = "phivault", "smtp-test-secret"


@dataclass
class Inbox:
    messages: list[Message] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802  # aiosmtpd's hook name
        del server, session
        assert isinstance(envelope.content, bytes)
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: object
) -> AuthResult:
    del server, session, envelope, mechanism
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        SMTP_USER.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok)


@pytest.fixture(params=["none", "starttls"])
def inbox(request: pytest.FixtureRequest, runtime: Runtime) -> Iterator[Inbox]:
    """An SMTP server; with STARTTLS it presents the dev certificate and wants a login."""
    tls: str = request.param
    received = Inbox()
    port = free_port()
    settings = runtime.settings
    if tls == "starttls":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.cert_path, settings.key_path)
        controller = Controller(
            received,
            hostname="127.0.0.1",
            port=port,
            tls_context=context,
            require_starttls=True,
            authenticator=_authenticate,
            auth_require_tls=True,
        )
        mail = settings.model_copy(
            update={
                "smtp_host": "127.0.0.1",
                "smtp_port": port,
                "smtp_tls": "starttls",
                "smtp_username": SMTP_USER,
                "smtp_password": SecretStr(SMTP_PASSWORD),
                "smtp_ca_file": settings.cert_path,
            }
        )
    else:
        controller = Controller(received, hostname="127.0.0.1", port=port)
        mail = settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_tls": "none"})
    controller.start()
    runtime.accounts.mailer = SmtpMailer(mail)
    try:
        yield received
    finally:
        controller.stop()


def _deliver(runtime: Runtime, inbox: Inbox, count: int) -> Message:
    """Run queued jobs until ``count`` messages arrived; return the last."""
    worker = runtime.new_worker()
    deadline = time.monotonic() + 30
    while len(inbox.messages) < count and time.monotonic() < deadline:
        if not worker.run_once():
            time.sleep(0.05)
    assert len(inbox.messages) == count, f"{len(inbox.messages)} messages arrived"
    return inbox.messages[-1]


def _token(message: Message) -> str:
    body = message.get_payload(decode=True)
    assert isinstance(body, bytes)
    match = re.search(r"https://127\.0\.0\.1:8443/reset-password#token=([A-Za-z0-9_-]+)", body.decode())
    assert match, body
    logscan.plant(match[1])  # a reset token must never reach a log
    return match[1]


def test_reset_by_email_sets_a_password_ends_sessions_and_keeps_mfa(
    client: TestClient, factory: AccountsFactory, runtime: Runtime, inbox: Inbox, clock: ManualClock
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    access = login(client, member.email).json()["access_token"]
    enrol_totp(client, access, clock.now())

    requested = client.post("/api/v1/auth/password-reset", json={"email": member.email.upper()})
    unknown = client.post("/api/v1/auth/password-reset", json={"email": "nobody@example.org"})
    assert requested.status_code == unknown.status_code == 202
    assert requested.content == unknown.content == b""

    message = _deliver(runtime, inbox, 1)
    assert message["To"] == member.email
    assert message["From"] == runtime.settings.smtp_from
    token = _token(message)
    time.sleep(0.2)
    assert len(inbox.messages) == 1, "an unknown address got mail"

    weak = client.post(
        "/api/v1/auth/password-reset/confirm", json={"token": token, "new_password": "password1"}
    )
    assert problem(weak)["code"] == "password_policy"
    done = client.post(
        "/api/v1/auth/password-reset/confirm", json={"token": token, "new_password": NEW_PASSWORD}
    )
    assert done.status_code == 204
    assert client.get("/api/v1/auth/me", headers=bearer(access)).status_code == 401  # sessions ended
    again = client.post(
        "/api/v1/auth/password-reset/confirm", json={"token": token, "new_password": NEW_PASSWORD}
    )
    assert problem(again)["code"] == "invalid_reset_token"  # single use

    assert login(client, member.email).status_code == 401
    second_factor = login(client, member.email, NEW_PASSWORD)
    assert problem(second_factor)["code"] == "mfa_required"  # the reset did not bypass MFA


def test_reset_link_expires_after_fifteen_minutes(
    client: TestClient, factory: AccountsFactory, runtime: Runtime, inbox: Inbox, clock: ManualClock
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    client.post("/api/v1/auth/password-reset", json={"email": member.email})
    token = _token(_deliver(runtime, inbox, 1))
    clock.advance(timedelta(minutes=15, seconds=1))
    late = client.post(
        "/api/v1/auth/password-reset/confirm", json={"token": token, "new_password": NEW_PASSWORD}
    )
    assert late.status_code == 400
    assert problem(late)["code"] == "invalid_reset_token"
    assert login(client, member.email, PASSWORD).status_code == 200


@pytest.mark.parametrize("inbox", ["none"], indirect=True)
def test_reset_mail_is_limited_to_three_an_hour_per_address(
    client: TestClient, factory: AccountsFactory, runtime: Runtime, inbox: Inbox, clock: ManualClock
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    for _ in range(5):
        assert client.post("/api/v1/auth/password-reset", json={"email": member.email}).status_code == 202
    _deliver(runtime, inbox, 3)
    time.sleep(0.2)
    assert len(inbox.messages) == 3
    # only the newest link works
    tokens = [_token(message) for message in inbox.messages]
    old = client.post(
        "/api/v1/auth/password-reset/confirm", json={"token": tokens[0], "new_password": NEW_PASSWORD}
    )
    assert problem(old)["code"] == "invalid_reset_token"
    clock.advance(timedelta(hours=1, minutes=1))
    client.post("/api/v1/auth/password-reset", json={"email": member.email})
    _deliver(runtime, inbox, 4)
