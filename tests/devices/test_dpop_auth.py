"""Device requests (RFC 9449): each refusal the issue lists gets its own problem code, a
DPoP challenge and an audit event; revocation acts on the next request; nonces and the
replay cache hold across replicas sharing one database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from factories.accounts import CLI, LOOPBACK, AccountsFactory, bearer, problem
from factories.devices import BASE, TUS, DeviceKey, DeviceSession, all_audit_text, audit_events, issue_code
from phivault.accounts.permissions import Role
from phivault.clock import ManualClock
from phivault.config.settings import Settings
from phivault.runtime import Runtime, build_runtime
from phivault.web.app import create_app

UPLOADS = "/api/v1/uploads"


def _create(device: DeviceSession, proof: str, token: str | None = None) -> object:
    headers = {**TUS, "Upload-Length": "10", "DPoP": proof, "Authorization": f"DPoP {token or device.token}"}
    return device.client.post(UPLOADS, headers=headers)


def _refusal(response: object, code: str) -> None:
    assert response.status_code == 401, response.text  # type: ignore[attr-defined]
    assert problem(response)["code"] == code  # type: ignore[arg-type]
    assert response.headers["www-authenticate"].startswith("DPoP ")  # type: ignore[attr-defined]
    assert response.headers["dpop-nonce"]  # type: ignore[attr-defined]


def test_a_device_uploads_and_reads_nothing_else(device: DeviceSession) -> None:
    assert device.create_upload(10).status_code == 201
    for method, path in (
        ("GET", "/api/v1/auth/me"),
        ("GET", "/api/v1/users"),
        ("GET", "/api/v1/devices"),
        ("GET", "/api/v1/audit/events"),
        ("GET", "/api/v1/quarantine"),
        ("POST", "/api/v1/devices/codes"),
    ):
        answer = device.send(method, path, json_body={} if method == "POST" else None)
        assert answer.status_code == 403, (path, answer.text)
        assert problem(answer)["code"] == "forbidden"


def test_a_replayed_proof_is_refused(runtime: Runtime, device: DeviceSession) -> None:
    assert device.create_upload(10).status_code == 201  # now holds a nonce
    proof = device.key.proof("POST", BASE + UPLOADS, token=device.token, nonce=device.nonce)
    assert _create(device, proof).status_code == 201  # type: ignore[attr-defined]
    _refusal(_create(device, proof), "dpop_proof_replayed")
    assert audit_events(runtime, "device.proof_fail")[-1] == (
        "device",
        device.device_id,
        "device",
        device.device_id,
        "denied",
    )


def test_a_proof_for_another_url_is_refused(device: DeviceSession) -> None:
    device.create_upload(10)
    proof = device.key.proof("POST", BASE + "/api/v1/uploads/other", token=device.token, nonce=device.nonce)
    _refusal(_create(device, proof), "dpop_url_mismatch")
    elsewhere = device.key.proof(
        "POST", "https://evil.example" + UPLOADS, token=device.token, nonce=device.nonce
    )
    _refusal(_create(device, elsewhere), "dpop_url_mismatch")


def test_a_proof_for_another_method_is_refused(device: DeviceSession) -> None:
    device.create_upload(10)
    proof = device.key.proof("GET", BASE + UPLOADS, token=device.token, nonce=device.nonce)
    _refusal(_create(device, proof), "dpop_method_mismatch")


def test_a_stale_or_future_proof_is_refused(runtime: Runtime, device: DeviceSession) -> None:
    device.create_upload(10)
    now = runtime.clock.now().timestamp()
    for iat in (now - 301, now + 301):
        proof = device.key.proof("POST", BASE + UPLOADS, token=device.token, nonce=device.nonce, iat=iat)
        _refusal(_create(device, proof), "dpop_proof_expired")


def test_a_proof_without_the_server_nonce_gets_a_nonce_challenge(
    runtime: Runtime, clock: ManualClock, device: DeviceSession
) -> None:
    proof = device.key.proof("POST", BASE + UPLOADS, token=device.token)
    challenge = _create(device, proof)
    _refusal(challenge, "use_dpop_nonce")
    assert 'error="use_dpop_nonce"' in challenge.headers["www-authenticate"]  # type: ignore[attr-defined]
    nonce = challenge.headers["dpop-nonce"]  # type: ignore[attr-defined]
    retried = _create(device, device.key.proof("POST", BASE + UPLOADS, token=device.token, nonce=nonce))
    assert retried.status_code == 201  # type: ignore[attr-defined]
    # a nonce runs out after its lifetime; a challenge then hands out the next one
    clock.advance(timedelta(seconds=runtime.settings.dpop_nonce_seconds))
    stale = _create(device, device.key.proof("POST", BASE + UPLOADS, token=device.token, nonce=nonce))
    _refusal(stale, "use_dpop_nonce")
    assert stale.headers["dpop-nonce"] != nonce  # type: ignore[attr-defined]
    forged = _create(
        device, device.key.proof("POST", BASE + UPLOADS, token=device.token, nonce="AQAAAAAAAAAA")
    )
    _refusal(forged, "use_dpop_nonce")
    # the nonce dance is the protocol working, not a failed proof: it is not audited
    assert audit_events(runtime, "device.proof_fail") == []


def test_a_proof_for_another_token_is_refused(device: DeviceSession) -> None:
    device.create_upload(10)
    proof = device.key.proof("POST", BASE + UPLOADS, token="another-token", nonce=device.nonce)
    _refusal(_create(device, proof), "dpop_ath_mismatch")
    unbound = device.key.proof("POST", BASE + UPLOADS, nonce=device.nonce)
    _refusal(_create(device, unbound), "dpop_ath_mismatch")


def test_a_proof_signed_by_another_key_is_refused(
    device: DeviceSession,
    new_key: Callable[..., DeviceKey],
    new_device: Callable[..., DeviceSession],
) -> None:
    device.create_upload(10)
    stranger = new_key()
    forged = stranger.proof("POST", BASE + UPLOADS, token=device.token, nonce=device.nonce)
    _refusal(_create(device, forged), "dpop_key_mismatch")
    # another activated device's key is just as wrong
    other = new_device(device.institution_id)
    theirs = other.key.proof("POST", BASE + UPLOADS, token=device.token, nonce=device.nonce)
    _refusal(_create(device, theirs), "dpop_key_mismatch")


def test_a_revoked_device_is_refused_at_its_next_request(runtime: Runtime, device: DeviceSession) -> None:
    assert device.create_upload(10).status_code == 201
    runtime.devices.revoke(CLI, str(device.device_id))
    _refusal(device.create_upload(10), "device_revoked")
    _refusal(device.refresh_token(), "device_revoked")


def test_an_unknown_key_gets_no_token(client: TestClient, new_key: Callable[..., DeviceKey]) -> None:
    stranger = DeviceSession(client, new_key())
    _refusal(stranger.refresh_token(), "device_not_activated")


def test_an_unknown_or_expired_token_is_refused_and_a_proof_gets_a_new_one(
    runtime: Runtime, clock: ManualClock, device: DeviceSession
) -> None:
    clock.advance(timedelta(seconds=runtime.settings.device_token_seconds))
    _refusal(device.create_upload(10), "invalid_token")
    assert device.refresh_token().status_code == 200
    assert device.create_upload(10).status_code == 201
    device.token = "made-up-token"
    _refusal(device.create_upload(10), "invalid_token")


def test_a_device_token_sent_as_a_bearer_token_is_refused(device: DeviceSession) -> None:
    answer = device.client.post(UPLOADS, headers={**TUS, "Upload-Length": "10", **bearer(str(device.token))})
    assert answer.status_code == 401
    assert problem(answer)["code"] == "token_requires_dpop"
    me = device.client.get("/api/v1/auth/me", headers=bearer(str(device.token)))
    assert problem(me)["code"] == "token_requires_dpop"


def test_a_user_token_cannot_be_used_as_a_device_token(
    factory: AccountsFactory, institution: str, device: DeviceSession
) -> None:
    clinician = factory.member(Role.CLINICIAN, institution, mfa=True)
    token, _ = factory.session_for(clinician)
    device.create_upload(10)
    proof = device.key.proof("POST", BASE + UPLOADS, token=token, nonce=device.nonce)
    _refusal(_create(device, proof, token=token), "invalid_token")
    # and a user's bearer token on the device API is refused for what it is
    answer = device.client.post(UPLOADS, headers={**TUS, "Upload-Length": "10", **bearer(token)})
    assert answer.status_code == 403
    assert problem(answer)["code"] == "forbidden"


def test_more_than_one_proof_header_is_refused(device: DeviceSession) -> None:
    device.create_upload(10)
    proof = device.key.proof("POST", BASE + UPLOADS, token=device.token, nonce=device.nonce)
    headers = [
        ("Tus-Resumable", "1.0.0"),
        ("Upload-Length", "10"),
        ("Authorization", f"DPoP {device.token}"),
        ("DPoP", proof),
        ("DPoP", proof),
    ]
    answer = device.client.post(UPLOADS, headers=headers)
    _refusal(answer, "dpop_proof_missing")


def test_failed_proofs_are_audited_without_tokens_or_proofs(runtime: Runtime, device: DeviceSession) -> None:
    device.create_upload(10)
    proof = device.key.proof("GET", BASE + UPLOADS, token=device.token, nonce=device.nonce)
    _create(device, proof)
    _create(device, "garbage.proof.value")
    events = audit_events(runtime, "device.proof_fail")
    assert [e[0] for e in events] == ["anonymous", "anonymous"]  # the proof is judged before the token
    text = all_audit_text(runtime)
    assert str(device.token) not in text
    assert proof not in text


@pytest.fixture
def replica(settings: Settings, clock: ManualClock, runtime: Runtime) -> Iterator[TestClient]:
    """A second phivault on the same database, object store and keyring."""
    del runtime  # the first replica initialised the databases
    other = build_runtime(settings, clock=clock)
    with TestClient(create_app(other), base_url="https://testserver", client=LOOPBACK) as test_client:
        yield test_client
    other.close()


def test_nonces_and_the_replay_cache_hold_across_replicas(
    runtime: Runtime,
    client: TestClient,
    replica: TestClient,
    institution: str,
    new_key: Callable[..., DeviceKey],
) -> None:
    device = DeviceSession(client, new_key())
    assert device.activate(issue_code(runtime, institution)).status_code == 200
    nonce = device.nonce  # made by the first replica
    proof = device.key.proof("POST", BASE + UPLOADS, token=device.token, nonce=nonce)
    on_replica = DeviceSession(replica, device.key, token=device.token, nonce=nonce)
    created = on_replica.client.post(
        UPLOADS,
        headers={**TUS, "Upload-Length": "10", "DPoP": proof, "Authorization": f"DPoP {device.token}"},
    )
    assert created.status_code == 201, created.text
    _refusal(_create(device, proof), "dpop_proof_replayed")  # back on the first replica
    # revocation on one replica is seen by the other at once
    runtime.devices.revoke(CLI, str(device.device_id))
    _refusal(on_replica.create_upload(10), "device_revoked")
