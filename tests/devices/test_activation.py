"""Activation codes and activation: single use, expiry, serial and TLS pin binding, one
key per device, proofs of possession; every activation (and refusal) audited.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select

from factories.accounts import CLI, AccountsFactory, bearer, problem
from factories.devices import DeviceKey, DeviceSession, all_audit_text, audit_events, issue_code
from phivault.accounts.permissions import Role
from phivault.clock import ManualClock
from phivault.devices.models import ActivationCode, Device
from phivault.devices.service import CODE_ALPHABET, normalise_code
from phivault.runtime import Runtime


def test_a_code_activates_one_device_with_the_key_of_its_proof(
    runtime: Runtime, client: TestClient, institution: str, new_key: Callable[..., DeviceKey]
) -> None:
    code = issue_code(runtime, institution)
    key = new_key()
    device = DeviceSession(client, key)
    answer = device.activate(code)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "DPoP"
    assert body["institution_id"] == institution
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["dpop-nonce"]
    listed = runtime.devices.list_devices(CLI, institution)
    assert [(d.id, d.key_thumbprint, d.revoked_at) for d in listed] == [
        (body["device_id"], key.thumbprint, None)
    ]
    assert audit_events(runtime, "device.activate") == [
        ("device", body["device_id"], "device", body["device_id"], "success")
    ]
    assert code not in all_audit_text(runtime)
    assert body["access_token"] not in all_audit_text(runtime)


def test_codes_have_125_bits_and_are_stored_only_as_digests(runtime: Runtime, institution: str) -> None:
    codes = {issue_code(runtime, institution) for _ in range(20)}
    assert len(codes) == 20
    for code in codes:
        assert re.fullmatch(r"([0-9A-Z]{5}-){4}[0-9A-Z]{5}", code)
        assert set(code.replace("-", "")) <= set(CODE_ALPHABET)  # 25 of 32 symbols: 125 bits
    with runtime.db.transaction() as session:
        stored = " ".join(f"{row.id} {row.digest}" for row in session.scalars(select(ActivationCode)))
    assert not any(code.replace("-", "") in stored or code in stored for code in codes)
    # typed with lower case, spaces, I for 1 and O for 0, a code still reads the same
    code = next(iter(codes))
    typed = code.lower().replace("-", " ").replace("1", "I").replace("0", "o")
    assert normalise_code(typed) == code.replace("-", "")


def test_a_used_code_is_refused(
    runtime: Runtime, client: TestClient, institution: str, new_key: Callable[..., DeviceKey]
) -> None:
    code = issue_code(runtime, institution)
    assert DeviceSession(client, new_key()).activate(code).status_code == 200
    again = DeviceSession(client, new_key()).activate(code)
    assert again.status_code == 400
    assert problem(again)["code"] == "activation_code_used"
    assert audit_events(runtime, "device.activate")[-1][0] == "anonymous"
    assert audit_events(runtime, "device.activate")[-1][-1] == "denied"


def test_an_expired_code_is_refused(
    runtime: Runtime,
    client: TestClient,
    clock: ManualClock,
    institution: str,
    new_key: Callable[..., DeviceKey],
) -> None:
    code = issue_code(runtime, institution)
    clock.advance(timedelta(hours=24, seconds=1))
    answer = DeviceSession(client, new_key()).activate(code)
    assert answer.status_code == 400
    assert problem(answer)["code"] == "activation_code_expired"


def test_a_code_just_before_expiry_still_works(
    runtime: Runtime,
    client: TestClient,
    clock: ManualClock,
    institution: str,
    new_key: Callable[..., DeviceKey],
) -> None:
    code = issue_code(runtime, institution)
    clock.advance(timedelta(hours=23, minutes=59))
    assert DeviceSession(client, new_key()).activate(code).status_code == 200


def test_an_unknown_code_is_refused(client: TestClient, new_key: Callable[..., DeviceKey]) -> None:
    answer = DeviceSession(client, new_key()).activate("AAAAA-BBBBB-CCCCC-DDDDD-EEEEE")
    assert answer.status_code == 400
    assert problem(answer)["code"] == "activation_code_invalid"
    garbage = DeviceSession(client, new_key()).activate("x" * 64)
    assert problem(garbage)["code"] == "activation_code_invalid"


def test_a_code_bound_to_a_serial_activates_only_that_serial(
    runtime: Runtime, client: TestClient, institution: str, new_key: Callable[..., DeviceKey]
) -> None:
    code = issue_code(runtime, institution, serial="SN-0042")
    wrong = DeviceSession(client, new_key()).activate(code, serial="SN-9999")
    assert problem(wrong)["code"] == "activation_serial_mismatch"
    missing = DeviceSession(client, new_key()).activate(code)
    assert problem(missing)["code"] == "activation_serial_mismatch"
    right = DeviceSession(client, new_key()).activate(code, serial="SN-0042")
    assert right.status_code == 200, right.text
    assert runtime.devices.get_device(CLI, right.json()["device_id"]).serial == "SN-0042"


def test_a_pin_of_another_certificate_is_refused_and_the_servers_own_is_accepted(
    runtime: Runtime, client: TestClient, institution: str, new_key: Callable[..., DeviceKey]
) -> None:
    issued = runtime.devices.create_code(CLI, institution)
    assert len(issued.server_pins) == 1
    assert issued.server_pins[0].startswith("sha256//")
    intercepted = DeviceSession(client, new_key()).activate(issued.code, tls_pin="sha256//" + "B" * 43 + "=")
    assert problem(intercepted)["code"] == "tls_pin_mismatch"
    genuine = DeviceSession(client, new_key()).activate(issued.code, tls_pin=issued.server_pins[0])
    assert genuine.status_code == 200, genuine.text


def test_one_key_cannot_activate_two_devices(
    runtime: Runtime, client: TestClient, institution: str, new_key: Callable[..., DeviceKey]
) -> None:
    key = new_key()
    assert DeviceSession(client, key).activate(issue_code(runtime, institution)).status_code == 200
    second = DeviceSession(client, key).activate(issue_code(runtime, institution))
    assert second.status_code == 409
    assert problem(second)["code"] == "device_key_in_use"


def test_activation_without_a_proof_is_refused_and_keeps_the_code(
    runtime: Runtime, client: TestClient, institution: str, new_key: Callable[..., DeviceKey]
) -> None:
    code = issue_code(runtime, institution)
    bare = client.post("/api/v1/devices/activate", json={"code": code})
    assert bare.status_code == 401
    assert problem(bare)["code"] == "dpop_proof_missing"
    assert bare.headers["www-authenticate"].startswith("DPoP ")
    assert DeviceSession(client, new_key()).activate(code).status_code == 200


def test_p256_devices_activate_too(
    runtime: Runtime, client: TestClient, institution: str, new_key: Callable[..., DeviceKey]
) -> None:
    session = DeviceSession(client, new_key("ES256"))
    assert session.activate(issue_code(runtime, institution)).status_code == 200
    assert session.create_upload(10).status_code == 201


def test_admins_make_codes_for_their_own_institution_only(
    runtime: Runtime, client: TestClient, factory: AccountsFactory, institution: str
) -> None:
    other = factory.institution("Away Clinic").id
    admin = factory.member(Role.INSTITUTION_ADMIN, institution, mfa=True)
    token, _ = factory.session_for(admin)
    made = client.post("/api/v1/devices/codes", headers=bearer(token), json={"serial": "SN-7"})
    assert made.status_code == 201, made.text
    assert made.json()["institution_id"] == institution
    assert made.json()["serial"] == "SN-7"
    assert audit_events(runtime, "device.code_create")[-1][:3] == ("user", admin.user_id, "activation_code")
    clinician = factory.member(Role.CLINICIAN, institution, mfa=True)
    clinician_token, _ = factory.session_for(clinician)
    refused = client.post("/api/v1/devices/codes", headers=bearer(clinician_token), json={})
    assert refused.status_code == 403
    away_admin = factory.member(Role.INSTITUTION_ADMIN, other, mfa=True)
    away_token, _ = factory.session_for(away_admin)
    assert (
        client.post("/api/v1/devices/codes", headers=bearer(away_token), json={}).json()["institution_id"]
        == other
    )


def test_admins_list_and_revoke_their_devices_and_not_anothers(
    runtime: Runtime,
    client: TestClient,
    factory: AccountsFactory,
    institution: str,
    device: DeviceSession,
) -> None:
    admin = factory.member(Role.INSTITUTION_ADMIN, institution, mfa=True)
    token, _ = factory.session_for(admin)
    listed = client.get("/api/v1/devices", headers=bearer(token)).json()["devices"]
    assert [d["id"] for d in listed] == [device.device_id]
    away_admin = factory.member(Role.INSTITUTION_ADMIN, factory.institution("Away").id, mfa=True)
    away_token, _ = factory.session_for(away_admin)
    assert client.get("/api/v1/devices", headers=bearer(away_token)).json()["devices"] == []
    for method, path in (("GET", ""), ("POST", "/revoke")):
        hidden = client.request(
            method, f"/api/v1/devices/{device.device_id}{path}", headers=bearer(away_token)
        )
        assert hidden.status_code == 404
        assert problem(hidden)["code"] == "not_found"
    revoked = client.post(f"/api/v1/devices/{device.device_id}/revoke", headers=bearer(token))
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    assert audit_events(runtime, "device.revoke") == [
        ("user", admin.user_id, "device", device.device_id, "success")
    ]
    with runtime.db.transaction() as session:
        assert session.get(Device, device.device_id) is not None
