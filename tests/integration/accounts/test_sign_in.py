"""Sign-in, MFA, rotating sessions, expiry, revocation and throttling, through the API."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from factories.accounts import PASSWORD, AccountsFactory, bearer, enrol_totp, login, problem, totp_code
from phivault.accounts.models import AuthSession, User
from phivault.accounts.passwords import Pbkdf2Hasher
from phivault.accounts.permissions import Role
from phivault.audit.models import AuditRecord
from phivault.clock import ManualClock
from phivault.runtime import Runtime


def _actions(runtime: Runtime) -> list[tuple[str, str]]:
    with runtime.db.transaction() as session:
        return [
            (row.action, row.outcome)
            for row in session.scalars(select(AuditRecord).order_by(AuditRecord.seq))
        ]


def test_login_returns_oauth_token_response_and_the_token_works(
    client: TestClient, factory: AccountsFactory, runtime: Runtime
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    response = login(client, member.email)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert response.headers["cache-control"] == "no-store"
    me = client.get("/api/v1/auth/me", headers=bearer(body["access_token"]))
    assert me.json()["id"] == member.user_id
    assert ("auth.login", "success") in _actions(runtime)
    # tokens are stored as digests only
    with runtime.db.engine.connect() as connection:
        dump = "\n".join(str(row) for row in connection.exec_driver_sql("SELECT * FROM access_tokens"))
        dump += "\n".join(str(row) for row in connection.exec_driver_sql("SELECT * FROM refresh_tokens"))
    assert body["access_token"] not in dump
    assert body["refresh_token"] not in dump


def test_unknown_user_wrong_password_and_locked_account_get_one_answer(
    client: TestClient, factory: AccountsFactory, runtime: Runtime
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    unknown = login(client, "nobody@example.org", "whatever it is")
    wrong = login(client, member.email, "not the password at all")
    for _ in range(6):
        login(client, member.email, "not the password at all")
    locked = login(client, member.email)  # the right password, while locked
    bodies = [problem(r) for r in (unknown, wrong, locked)]
    assert {r.status_code for r in (unknown, wrong, locked)} == {401}
    assert bodies[0] == bodies[1] == bodies[2]
    assert bodies[0]["code"] == "invalid_credentials"
    actions = _actions(runtime)
    assert ("auth.lockout", "denied") in actions
    assert ("auth.login", "denied") in actions  # the attempt during the lock
    assert ("auth.login", "failure") in actions


def test_unknown_user_costs_a_password_hash_like_a_wrong_password(
    client: TestClient, factory: AccountsFactory
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    login(client, "warm-up@example.org", "x" * 20)  # builds the dummy hash once

    def fastest(email: str) -> float:
        # The fastest of several: the least disturbed by other work on the machine.
        times = []
        for _ in range(4):
            started = time.perf_counter()
            login(client, email, "a wrong password here")
            times.append(time.perf_counter() - started)
        return min(times)

    unknown, known = fastest("nobody-at-all@example.org"), fastest(member.email)
    # Both verify one Argon2id hash (~40 ms here); without the dummy hash the unknown
    # user would answer in a few milliseconds.
    assert unknown > 0.5 * known, (unknown, known)


def test_lock_lifts_after_the_back_off(
    client: TestClient, factory: AccountsFactory, clock: ManualClock
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    for _ in range(6):
        login(client, member.email, "not the password at all")
    assert login(client, member.email).status_code == 401
    clock.advance(timedelta(seconds=3))  # sixth failure: locked for 2 s
    assert login(client, member.email).status_code == 200


def test_client_address_is_throttled_across_accounts(client: TestClient, clock: ManualClock) -> None:
    for index in range(31):  # 30 free failures; the 31st starts a back-off
        assert login(client, f"guess{index}@example.org", "guess guess guess").status_code == 401
    throttled = login(client, "guess-more@example.org", "guess guess guess")
    assert throttled.status_code == 429
    assert problem(throttled)["code"] == "rate_limited"
    assert int(throttled.headers["retry-after"]) >= 1
    clock.advance(timedelta(hours=2))
    assert login(client, "guess-more@example.org", "guess guess guess").status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"email": "x" * 255 + "@example.org", "password": "p"},
        {"email": "a@example.org", "password": "é" * 513},  # 1026 bytes
        {"email": "a@example.org"},
        {"email": 5, "password": []},
        {"email": "a@example.org", "password": "p", "extra": 1},
    ],
)
def test_malformed_or_oversized_credentials_are_422(client: TestClient, body: dict[str, object]) -> None:
    response = client.post("/api/v1/auth/login", json=body)
    assert response.status_code == 422
    assert problem(response)["code"] == "validation_error"
    assert all("input" not in error for error in problem(response).get("errors", []))  # no echo


def test_body_that_is_not_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/api/v1/auth/login", content=b'{"email": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert problem(response)["code"] == "malformed_body"


def test_password_of_exactly_1024_bytes_is_accepted_as_input(client: TestClient) -> None:
    response = login(client, "a@example.org", "é" * 512)
    assert response.status_code == 401


def test_mfa_flow_codes_are_single_use_and_recovery_codes_work_once(
    client: TestClient, factory: AccountsFactory, clock: ManualClock, runtime: Runtime
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    first = login(client, member.email).json()["access_token"]
    seed, recovery = enrol_totp(client, first, clock.now())
    assert len(recovery) == 10
    assert len(set(recovery)) == 10

    clock.advance(timedelta(seconds=30))
    challenge = login(client, member.email)
    assert challenge.status_code == 401
    body = problem(challenge)
    assert body["code"] == "mfa_required"
    code = totp_code(seed, clock.now())
    verified = client.post("/api/v1/auth/mfa/verify", json={"mfa_token": body["mfa_token"], "code": code})
    assert verified.status_code == 200
    assert set(verified.json()) == {"access_token", "token_type", "expires_in", "refresh_token"}

    # the same code again, in the same 30 s: refused
    again = problem(login(client, member.email))
    reused = client.post("/api/v1/auth/mfa/verify", json={"mfa_token": again["mfa_token"], "code": code})
    assert reused.status_code == 401
    assert problem(reused)["code"] == "invalid_mfa_code"
    # a recovery code instead, once
    ok = client.post(
        "/api/v1/auth/mfa/verify", json={"mfa_token": again["mfa_token"], "code": recovery[0].upper()}
    )
    assert ok.status_code == 200
    later = problem(login(client, member.email))
    spent = client.post(
        "/api/v1/auth/mfa/verify", json={"mfa_token": later["mfa_token"], "code": recovery[0]}
    )
    assert problem(spent)["code"] == "invalid_mfa_code"
    actions = _actions(runtime)
    assert ("mfa.enable", "success") in actions
    assert ("auth.mfa", "failure") in actions


def test_totp_accepts_one_step_of_drift_either_way_but_not_two(
    client: TestClient, factory: AccountsFactory, clock: ManualClock
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    seed, _ = enrol_totp(client, login(client, member.email).json()["access_token"], clock.now())
    clock.advance(timedelta(minutes=5))
    for offset, expected in ((-60, 401), (-30, 200), (30, 200), (60, 401)):
        clock.advance(timedelta(seconds=90))
        token = problem(login(client, member.email))["mfa_token"]
        code = totp_code(seed, clock.now() + timedelta(seconds=offset))
        answer = client.post("/api/v1/auth/mfa/verify", json={"mfa_token": token, "code": code})
        assert answer.status_code == expected, offset


def test_mfa_token_expires_and_allows_five_attempts(
    client: TestClient, factory: AccountsFactory, clock: ManualClock
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    seed, _ = enrol_totp(client, login(client, member.email).json()["access_token"], clock.now())
    clock.advance(timedelta(minutes=1))
    token = problem(login(client, member.email))["mfa_token"]
    clock.advance(timedelta(minutes=6))
    late = client.post(
        "/api/v1/auth/mfa/verify", json={"mfa_token": token, "code": totp_code(seed, clock.now())}
    )
    assert problem(late)["code"] == "invalid_mfa_token"
    token = problem(login(client, member.email))["mfa_token"]
    for _ in range(5):
        client.post("/api/v1/auth/mfa/verify", json={"mfa_token": token, "code": "000000"})
    sixth = client.post(
        "/api/v1/auth/mfa/verify", json={"mfa_token": token, "code": totp_code(seed, clock.now())}
    )
    assert problem(sixth)["code"] == "invalid_mfa_token"


def test_refresh_rotates_and_reuse_revokes_the_family(
    client: TestClient, factory: AccountsFactory, runtime: Runtime
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    first = login(client, member.email).json()
    second = client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}).json()
    assert second["refresh_token"] != first["refresh_token"]
    third = client.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]}).json()
    assert client.get("/api/v1/auth/me", headers=bearer(third["access_token"])).status_code == 200

    # An attacker replays the first refresh token: the whole session ends.
    replay = client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert replay.status_code == 401
    assert problem(replay)["code"] == "invalid_grant"
    assert client.get("/api/v1/auth/me", headers=bearer(third["access_token"])).status_code == 401
    dead = client.post("/api/v1/auth/refresh", json={"refresh_token": third["refresh_token"]})
    assert dead.status_code == 401
    actions = _actions(runtime)
    assert ("auth.token_reuse", "denied") in actions
    assert ("session.end", "success") in actions


def test_idle_timeout_ends_the_session_without_sleeping(
    client: TestClient, factory: AccountsFactory, clock: ManualClock
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    tokens = login(client, member.email).json()
    for _ in range(3):  # activity keeps it alive past 15 minutes in all
        clock.advance(timedelta(minutes=4))
        tokens = client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).json()
        assert client.get("/api/v1/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
    clock.advance(timedelta(minutes=16))
    assert (
        client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code
        == 401
    )


def test_idle_timeout_follows_the_institution_setting(
    client: TestClient, factory: AccountsFactory, clock: ManualClock, runtime: Runtime
) -> None:
    home = factory.institution()
    admin = factory.member(Role.INSTITUTION_ADMIN, home.id, mfa=True)
    admin_token, _ = factory.session_for(admin)
    patched = client.patch(
        f"/api/v1/institutions/{home.id}/settings",
        headers=bearer(admin_token),
        json={"idle_timeout_minutes": 5},
    )
    assert patched.status_code == 200
    assert patched.json()["idle_timeout_minutes"] == 5
    for value in (4, 61):  # the allowed range is 5 to 60 minutes
        bad = client.patch(
            f"/api/v1/institutions/{home.id}/settings",
            headers=bearer(admin_token),
            json={"idle_timeout_minutes": value},
        )
        assert bad.status_code == 422
    member = factory.member(Role.CLINICIAN, home.id)
    tokens = login(client, member.email).json()
    clock.advance(timedelta(minutes=4))
    assert client.get("/api/v1/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
    clock.advance(timedelta(minutes=5, seconds=1))
    refreshed = client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert problem(refreshed)["code"] == "invalid_grant"
    with runtime.db.transaction() as session:
        reasons = set(
            session.scalars(select(AuthSession.revoke_reason).where(AuthSession.user_id == member.user_id))
        )
    assert reasons == {"idle_timeout"}


def test_absolute_lifetime_is_twelve_hours_whatever_the_activity(
    client: TestClient, factory: AccountsFactory, clock: ManualClock
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    tokens = login(client, member.email).json()
    for _ in range(12 * 6 - 1):  # every 10 minutes for 11 h 50 min
        clock.advance(timedelta(minutes=10))
        tokens = client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).json()
    assert client.get("/api/v1/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
    clock.advance(timedelta(minutes=10))
    assert client.get("/api/v1/auth/me", headers=bearer(tokens["access_token"])).status_code == 401
    assert (
        client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code
        == 401
    )


def test_access_token_lives_five_minutes(
    client: TestClient, factory: AccountsFactory, clock: ManualClock
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    access = login(client, member.email).json()["access_token"]
    clock.advance(timedelta(minutes=4, seconds=59))
    assert client.get("/api/v1/auth/me", headers=bearer(access)).status_code == 200
    clock.advance(timedelta(seconds=2))
    expired = client.get("/api/v1/auth/me", headers=bearer(access))
    assert expired.status_code == 401
    assert expired.headers["www-authenticate"].startswith("Bearer")
    assert problem(expired)["code"] == "unauthorized"


def test_logout_password_change_disable_and_admin_end_sessions_revoke_at_once(
    client: TestClient, factory: AccountsFactory, runtime: Runtime
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    admin = factory.member(Role.INSTITUTION_ADMIN, home.id, mfa=True)
    admin_token, _ = factory.session_for(admin)

    one = login(client, member.email).json()["access_token"]
    assert client.post("/api/v1/auth/logout", headers=bearer(one)).status_code == 204
    assert client.get("/api/v1/auth/me", headers=bearer(one)).status_code == 401

    keep, other = (login(client, member.email).json()["access_token"] for _ in range(2))
    changed = client.post(
        "/api/v1/auth/password",
        headers=bearer(keep),
        json={"current_password": PASSWORD, "new_password": "an entirely different phrase"},
    )
    assert changed.status_code == 204
    assert client.get("/api/v1/auth/me", headers=bearer(other)).status_code == 401
    assert client.get("/api/v1/auth/me", headers=bearer(keep)).status_code == 200
    assert login(client, member.email).status_code == 401
    new_password = "an entirely different phrase"

    ended = client.post(f"/api/v1/users/{member.user_id}/end-sessions", headers=bearer(admin_token))
    assert ended.json() == {"ended": 1}
    assert client.get("/api/v1/auth/me", headers=bearer(keep)).status_code == 401

    again = login(client, member.email, new_password).json()["access_token"]
    disabled = client.post(f"/api/v1/users/{member.user_id}/disable", headers=bearer(admin_token))
    assert disabled.json()["disabled"] is True
    assert client.get("/api/v1/auth/me", headers=bearer(again)).status_code == 401
    assert problem(login(client, member.email, new_password))["code"] == "invalid_credentials"
    assert ("user.disable", "success") in _actions(runtime)


def test_own_sessions_are_listed_and_ended_one_by_one(client: TestClient, factory: AccountsFactory) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    first, second = (login(client, member.email).json()["access_token"] for _ in range(2))
    sessions = client.get("/api/v1/auth/sessions", headers=bearer(first)).json()["sessions"]
    assert len(sessions) == 2
    other = next(s for s in sessions if not s["current"])
    assert client.delete(f"/api/v1/auth/sessions/{other['id']}", headers=bearer(first)).status_code == 204
    assert client.get("/api/v1/auth/me", headers=bearer(second)).status_code == 401
    assert client.delete(f"/api/v1/auth/sessions/{other['id']}", headers=bearer(first)).status_code == 404


def test_password_change_is_checked_against_the_policy_and_the_current_password(
    client: TestClient, factory: AccountsFactory
) -> None:
    home = factory.institution("Mercy General")
    member = factory.member(Role.CLINICIAN, home.id, email="jdoe@example.org")
    access = login(client, member.email).json()["access_token"]

    def change(current: str, new: str) -> list[str] | str:
        response = client.post(
            "/api/v1/auth/password",
            headers=bearer(access),
            json={"current_password": current, "new_password": new},
        )
        body = response.json() if response.content else {}
        return body.get("reasons") or body.get("code") or str(response.status_code)

    assert change("wrong current password", "a fine new passphrase") == "wrong_password"
    assert change(PASSWORD, "xq7 zk") == ["too_short"]
    assert change(PASSWORD, "iloveyou") == ["too_short", "common_password"]
    assert change(PASSWORD, "qwertyuiop123") == ["common_password"]
    assert change(PASSWORD, "my name is jdoe, hello") == ["contains_context_word"]
    assert change(PASSWORD, "mercy general forever!") == ["contains_context_word"]
    assert change(PASSWORD, PASSWORD) == ["same_as_current"]
    assert change(PASSWORD, "x" * 64 + " a 64+ character passphrase is allowed") == "204"


def test_password_rehashed_at_login_when_parameters_change(
    client: TestClient, factory: AccountsFactory, runtime: Runtime
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    runtime.accounts.hasher = Pbkdf2Hasher(600_000)  # PHIVAULT_FIPS=1 switched on
    assert login(client, member.email).status_code == 200
    with runtime.db.transaction() as session:
        stored = session.get(User, member.user_id)
        assert stored is not None
        assert stored.password_hash.startswith("$pbkdf2-sha256$i=600000$")
    assert login(client, member.email).status_code == 200  # and it verifies


def test_audit_records_carry_ids_not_emails_or_passwords(
    client: TestClient, factory: AccountsFactory, runtime: Runtime
) -> None:
    home = factory.institution()
    member = factory.member(Role.CLINICIAN, home.id, email="private.person@example.org")
    login(client, member.email, "wrong password, recorded?")
    login(client, member.email)
    with runtime.db.engine.connect() as connection:
        dump = "\n".join(str(row) for row in connection.exec_driver_sql("SELECT * FROM audit_records"))
    assert member.user_id in dump
    assert "private.person" not in dump
    assert "wrong password" not in dump
    assert PASSWORD not in dump


def test_admin_sessions_only_from_the_admin_networks(
    runtime: Runtime, factory: AccountsFactory, client: TestClient
) -> None:
    from phivault.web.app import create_app  # noqa: PLC0415

    home = factory.institution()
    admin = factory.member(Role.INSTITUTION_ADMIN, home.id, mfa=True)
    clinician = factory.member(Role.CLINICIAN, home.id)
    admin_token, _ = factory.session_for(admin)
    clinician_token, _ = factory.session_for(clinician)
    with TestClient(
        create_app(runtime), base_url="https://testserver", client=("203.0.113.7", 4000)
    ) as outside:
        refused = outside.get("/api/v1/users", headers=bearer(admin_token))
        assert refused.status_code == 403
        assert problem(refused)["code"] == "ip_not_allowed"
        assert outside.get("/api/v1/auth/me", headers=bearer(clinician_token)).status_code == 200
        login_refused = login(outside, admin.email)
        assert problem(login_refused)["code"] == "ip_not_allowed"
    assert client.get("/api/v1/users", headers=bearer(admin_token)).status_code == 200


def test_first_sign_in_of_an_operator_requires_a_new_password_then_mfa(
    client: TestClient, runtime: Runtime, clock: ManualClock
) -> None:
    created = runtime.accounts.ensure_bootstrap_operator()
    assert created is not None
    assert runtime.accounts.ensure_bootstrap_operator() is None  # once
    email, one_time = created
    access = login(client, email, one_time).json()["access_token"]
    blocked = client.get("/api/v1/institutions", headers=bearer(access))
    assert problem(blocked)["code"] == "password_change_required"
    assert client.get("/api/v1/auth/me", headers=bearer(access)).json()["must_change_password"] is True
    changed = client.post(
        "/api/v1/auth/password",
        headers=bearer(access),
        json={"current_password": one_time, "new_password": "a carefully chosen phrase"},
    )
    assert changed.status_code == 204
    assert (
        problem(client.get("/api/v1/institutions", headers=bearer(access)))["code"]
        == "mfa_enrolment_required"
    )
    enrol_totp(client, access, clock.now())
    assert client.get("/api/v1/institutions", headers=bearer(access)).status_code == 200
    assert login(client, email, one_time).status_code == 401  # the one-time password is gone


def test_a_one_time_password_expires_unchanged_and_an_admin_issues_a_new_one(
    client: TestClient, factory: AccountsFactory, runtime: Runtime, clock: ManualClock
) -> None:
    """NIST SP 800-63B: a temporary secret expires (PHIVAULT_ONE_TIME_PASSWORD_HOURS, 72 h);
    told apart from a wrong password only to whoever knows the password.
    """
    home = factory.institution()
    admin = factory.member(Role.INSTITUTION_ADMIN, home.id, mfa=True)
    admin_token, _ = factory.session_for(admin)
    created = client.post(
        "/api/v1/users",
        headers=bearer(admin_token),
        json={"email": "newcomer@example.org", "role": "clinician"},
    )
    assert created.status_code == 201, created.text
    user_id, first = created.json()["id"], created.json()["one_time_password"]
    clock.advance(timedelta(hours=71, minutes=59))
    assert login(client, "newcomer@example.org", first).status_code == 200  # still in time
    clock.advance(timedelta(minutes=1))
    expired = login(client, "newcomer@example.org", first)
    assert (expired.status_code, problem(expired)["code"]) == (401, "one_time_password_expired")
    wrong = login(client, "newcomer@example.org", "not the one-time password")
    assert problem(wrong)["code"] == "invalid_credentials"
    assert ("auth.login", "denied") in _actions(runtime)

    admin_token, _ = factory.session_for(admin)  # the first session ended long ago
    issued = client.post(f"/api/v1/users/{user_id}/one-time-password", headers=bearer(admin_token))
    assert issued.status_code == 200, issued.text
    second = issued.json()["one_time_password"]
    assert second != first
    assert issued.json()["must_change_password"] is True
    assert login(client, "newcomer@example.org", first).status_code == 401
    access = login(client, "newcomer@example.org", second).json()["access_token"]
    changed = client.post(
        "/api/v1/auth/password",
        headers=bearer(access),
        json={"current_password": second, "new_password": "a carefully chosen phrase"},
    )
    assert changed.status_code == 204
    clock.advance(timedelta(days=30))  # a chosen password does not expire
    assert login(client, "newcomer@example.org", "a carefully chosen phrase").status_code == 200
    assert ("password.reset", "success") in _actions(runtime)


def test_only_user_managers_of_the_institution_issue_one_time_passwords(
    client: TestClient, factory: AccountsFactory
) -> None:
    home, other = factory.institution(), factory.institution()
    member = factory.member(Role.CLINICIAN, home.id)
    for role, institution in ((Role.CLINICIAN, home.id), (Role.INSTITUTION_ADMIN, other.id)):
        actor = factory.member(role, institution, mfa=True)
        token, _ = factory.session_for(actor)
        refused = client.post(f"/api/v1/users/{member.user_id}/one-time-password", headers=bearer(token))
        assert refused.status_code in (403, 404), refused.text
    assert login(client, member.email).status_code == 200  # the password did not change
