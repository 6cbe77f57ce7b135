"""Share links: opened without credentials they carry no PHI at all; dead links all look
alike; passcodes are throttled; the egress guard blocks what de-identification let through.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select

from factories.accounts import LOOPBACK, bearer
from factories.dicom_factory import PATIENT_NAME, PRIVATE_CREATOR
from factories.exams import ExamsFactory, IngestedStudy
from phivault.accounts.mail import MailError
from phivault.accounts.permissions import Role
from phivault.audit.models import AuditRecord
from phivault.clock import ManualClock
from phivault.db.models import Job
from phivault.exams.outbound_models import ShareLink
from phivault.runtime import Runtime
from phivault.web.app import create_app


@dataclass
class World:
    runtime: Runtime
    client: TestClient
    study: IngestedStudy
    clinician: dict[str, str]
    other: dict[str, str]


def _world(runtime: Runtime, *, policy: dict[str, Any] | None = None) -> World:
    exams = ExamsFactory(runtime)
    home = exams.accounts.institution().id
    away = exams.accounts.institution().id
    if policy is not None:
        admin = exams.accounts.member(Role.INSTITUTION_ADMIN, home, mfa=True)
        client = TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK)
        token = bearer(exams.accounts.session_for(admin, mfa=True)[0])
        client.put("/api/v1/ingest/policy", json=policy, headers=token).raise_for_status()
    study = exams.study(home, instances=2, frames=2)
    clinician = exams.accounts.member(Role.CLINICIAN, home, mfa=True)
    stranger = exams.accounts.member(Role.CLINICIAN, away, mfa=True)
    client = TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK)
    return World(
        runtime,
        client,
        study,
        bearer(exams.accounts.session_for(clinician, mfa=True)[0]),
        bearer(exams.accounts.session_for(stranger, mfa=True)[0]),
    )


@pytest.fixture
def world(runtime: Runtime) -> World:
    return _world(runtime)


def _share(world: World, **body: Any) -> dict[str, Any]:  # noqa: ANN401
    expires = (world.runtime.clock.now() + timedelta(days=2)).isoformat()
    response = world.client.post(
        f"/api/v1/exams/{world.study.study_id}/shares",
        json={"expires_at": expires, **body},
        headers=world.clinician,
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def _advance(runtime: Runtime, delta: timedelta) -> None:
    clock = runtime.clock
    assert isinstance(clock, ManualClock)
    clock.advance(delta)


def _path(share: dict[str, Any]) -> str:
    url = share["url"]
    assert isinstance(url, str)
    return url[url.index("/share/") :]


def _leaks(content: bytes, planted: list[str]) -> list[str]:
    low = content.lower()
    found = [value for value in planted if value.lower().encode() in low]
    return found + [v for v in planted if v.encode("utf-16-le").lower() in low and v not in found]


def test_a_share_opened_without_credentials_carries_no_planted_phi(world: World) -> None:
    share = _share(world, mode="download")
    path = _path(share)
    anonymous = TestClient(create_app(world.runtime), base_url="https://testserver", client=LOOPBACK)
    responses = [anonymous.get(path), anonymous.get(path, headers={"Accept": "application/json"})]
    listing = responses[1].json()
    assert len(listing["instances"]) == 2
    for item in listing["instances"]:
        responses.append(anonymous.get(item["download"]))
        responses.extend(
            anonymous.get(item["rendered"], headers={"Accept": accept})
            for accept in ("image/png", "image/jpeg")
        )
        responses.append(anonymous.get(item["rendered"] + "?frame=2", headers={"Accept": "image/png"}))
    assert [r.status_code for r in responses] == [200] * len(responses)
    leaks: list[str] = []
    for response in responses:
        whole = b"".join(f"{k}: {v}\n".encode() for k, v in response.headers.items()) + response.content
        leaks += _leaks(whole, world.study.planted)
        kind = response.headers["content-type"]
        if kind.startswith("image/"):
            image = Image.open(io.BytesIO(response.content))
            text = repr(image.info) + repr(getattr(image, "text", {})) + repr(dict(image.getexif()))
            leaks += _leaks(text.encode(), world.study.planted)
            assert not image.getexif()
        if kind == "application/dicom":
            dataset = dcmread(io.BytesIO(response.content))
            assert dataset.PatientIdentityRemoved == "YES"
            assert "instance-" in response.headers["content-disposition"]
            assert response.headers["content-length"] == str(len(response.content))
    assert leaks == []
    assert PATIENT_NAME.encode() not in b"".join(r.content for r in responses)


def test_expired_revoked_and_unknown_links_answer_the_same_404(world: World) -> None:
    revoked, expired = _share(world), _share(world)
    deleted = world.client.delete(
        f"/api/v1/exams/{world.study.study_id}/shares/{revoked['id']}", headers=world.clinician
    )
    assert deleted.json()["status"] == "revoked"
    assert world.client.get(_path(expired)).status_code == 200
    _advance(world.runtime, timedelta(days=3))
    bodies = set()
    for path in (_path(revoked), _path(expired), "/share/" + "A" * 43, "/share/x"):
        for suffix in ("", "/instances/1", "/instances/1/rendered"):
            response = world.client.get(path + suffix)
            assert response.status_code == 404, (path, suffix)
            bodies.add(response.content)
    assert len(bodies) == 1
    assert b"detail" not in next(iter(bodies))


def test_expiry_is_required_and_at_most_the_configured_days(world: World) -> None:
    url = f"/api/v1/exams/{world.study.study_id}/shares"
    now = world.runtime.clock.now()
    missing = world.client.post(url, json={"mode": "view"}, headers=world.clinician)
    assert missing.status_code == 422
    too_far = world.client.post(
        url, json={"expires_at": (now + timedelta(days=8)).isoformat()}, headers=world.clinician
    )
    assert (too_far.status_code, too_far.json()["code"]) == (400, "share_expiry_too_far")
    past = world.client.post(
        url, json={"expires_at": (now - timedelta(hours=1)).isoformat()}, headers=world.clinician
    )
    assert (past.status_code, past.json()["code"]) == (400, "share_expiry_invalid")
    foreign = world.client.post(
        url, json={"expires_at": (now + timedelta(days=1)).isoformat()}, headers=world.other
    )
    assert foreign.status_code == 404


def test_a_view_only_link_shows_images_but_gives_no_dicom(world: World) -> None:
    path = _path(_share(world, mode="view"))
    assert world.client.get(path + "/instances/1/rendered").status_code == 200
    refused = world.client.get(path + "/instances/1")
    assert (refused.status_code, refused.json()["code"]) == (403, "share_view_only")
    assert b"Download DICOM" not in world.client.get(path).content


def test_passcode_is_asked_throttled_and_then_remembered_for_the_link(world: World) -> None:
    share = _share(world, mode="download", passcode="correct horse 42")
    path = _path(share)
    client = world.client
    asked = client.get(path)
    assert asked.status_code == 401
    assert b'name="passcode"' in asked.content
    assert client.get(path + "/instances/1").json()["code"] == "passcode_required"
    for _ in range(6):  # five free tries, the sixth failure starts a 2 s lock
        wrong = client.post(path, data={"passcode": "wrong guess"}, follow_redirects=False)
        assert wrong.status_code == 401
    locked = client.post(path, data={"passcode": "correct horse 42"}, follow_redirects=False)
    assert locked.status_code == 429
    _advance(world.runtime, timedelta(seconds=3))
    right = client.post(path, data={"passcode": "correct horse 42"}, follow_redirects=False)
    assert right.status_code == 303
    cookie = right.cookies.get("phivault_share")
    assert cookie
    assert "HttpOnly" in right.headers["set-cookie"]
    assert "Secure" in right.headers["set-cookie"]
    fresh = TestClient(create_app(world.runtime), base_url="https://testserver", client=LOOPBACK)
    granted = {"Cookie": f"phivault_share={cookie}"}
    assert fresh.get(path, headers=granted).status_code == 200
    assert fresh.get(path + "/instances/1", headers=granted).status_code == 200
    assert fresh.get(path, headers={"Cookie": f"phivault_share={cookie[:-2]}00"}).status_code == 401


def test_uses_are_counted_and_audited_by_id(world: World) -> None:
    share = _share(world)
    path = _path(share)
    for _ in range(3):
        assert world.client.get(path).status_code == 200
    listed = world.client.get(f"/api/v1/exams/{world.study.study_id}/shares", headers=world.clinician).json()
    assert listed["items"][0]["access_count"] == 3
    assert listed["items"][0]["status"] == "active"
    world.client.delete(f"/api/v1/exams/{world.study.study_id}/shares/{share['id']}", headers=world.clinician)
    with world.runtime.db.transaction() as session:
        rows = session.scalars(select(AuditRecord).where(AuditRecord.object_id == share["id"])).all()
        actions = sorted(row.action for row in rows)
        dumped = " ".join(f"{row.actor_id} {row.object_id}" for row in rows)
    assert actions == ["share.create", "share.revoke", "share.use", "share.use", "share.use"]
    token = share["url"].rsplit("/", 1)[1]
    assert token not in dumped


def test_no_smtp_server_means_the_answer_says_no_mail_was_sent(world: World) -> None:
    share = _share(world, recipient_email="colleague@elsewhere.example")
    assert share["delivery"] == "not_configured"
    assert "no e-mail was sent" in share["notice"]
    assert world.client.get(_path(share)).status_code == 200


def test_the_egress_guard_blocks_a_share_whose_stored_instance_holds_phi(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    # An allow-listed private element holds the patient's name: ingest keeps it, the guard must not.
    allowed = {"group": 9, "creator": PRIVATE_CREATOR, "element": 1}
    world = _world(runtime, policy={"private_allow_list": [allowed]})
    path = _path(_share(world, mode="download"))
    assert world.client.get(path + "/instances/1/rendered").status_code == 200  # pixels only
    with caplog.at_level(logging.ERROR):
        blocked = world.client.get(path + "/instances/1")
    assert (blocked.status_code, blocked.json()["code"]) == (404, "not_found")
    assert b"Zelphine" not in blocked.content
    alerts = [r.getMessage() for r in caplog.records if "SECURITY ALERT" in r.getMessage()]
    assert alerts
    assert "Zelphine" not in alerts[0]
    assert "Quixworth" not in alerts[0]
    assert world.client.get(path).status_code == 404  # the link is suspended
    with runtime.db.transaction() as session:
        row = session.scalars(select(ShareLink)).one()
        assert row.blocked_at is not None
        blocks = session.scalars(select(AuditRecord).where(AuditRecord.action == "egress.block")).all()
    assert {(r.object_type, r.outcome) for r in blocks} == {("share", "denied"), ("patient", "denied")}
    listed = world.client.get(f"/api/v1/exams/{world.study.study_id}/shares", headers=world.clinician)
    assert listed.json()["items"][0]["status"] == "blocked"


def test_an_e_mailed_link_is_made_by_the_job_and_never_queued(runtime: Runtime) -> None:
    world = _world(runtime)
    sent: list[tuple[str, str]] = []

    class Recording:
        def send(self, to: str, subject: str, body: str) -> None:
            del subject
            sent.append((to, body))

    shares = runtime.shares
    shares.mailer = Recording()
    object.__setattr__(shares.settings, "smtp_host", "smtp.example")  # as if configured
    share = _share(world, recipient_email="colleague@elsewhere.example")
    assert share["url"] is None
    assert share["delivery"] == "queued"
    with runtime.db.transaction() as session:
        payloads = [job.payload for job in session.scalars(select(Job).where(Job.kind == "exams.share_mail"))]
    assert payloads == [{"share_id": share["id"]}]
    worker = runtime.new_worker()
    for _ in range(10):
        if not worker.run_once():
            break
    ((to, body),) = sent
    assert to == "colleague@elsewhere.example"
    link = next(line for line in body.splitlines() if "/share/" in line)
    assert world.client.get(link[link.index("/share/") :]).status_code == 200
    assert PATIENT_NAME not in body


def test_a_de_identified_wado_download_holding_phi_is_withheld(runtime: Runtime) -> None:
    allowed = {"group": 9, "creator": PRIVATE_CREATOR, "element": 1}
    world = _world(runtime, policy={"private_allow_list": [allowed]})
    exams = ExamsFactory(runtime)
    admin = exams.accounts.member(Role.INSTITUTION_ADMIN, world.study.institution_id, mfa=True)
    headers = bearer(exams.accounts.session_for(admin, mfa=True)[0])  # exam:read without phi:read
    receipt = world.study.receipts[0]
    url = (
        f"/dicomweb/studies/{receipt.study_instance_uid}/series/{receipt.series_instance_uid}"
        f"/instances/{receipt.sop_instance_uid}"
    )
    withheld = world.client.get(url, headers={**headers, "Accept": "application/dicom"})
    assert (withheld.status_code, withheld.json()["code"]) == (451, "egress_blocked")
    assert b"Zelphine" not in withheld.content
    # A PHI reader gets the re-identified instance: PHI by design, not a leak.
    assert (
        world.client.get(url, headers={**world.clinician, "Accept": "application/dicom"}).status_code == 200
    )
    with runtime.db.transaction() as session:
        blocks = session.scalars(select(AuditRecord).where(AuditRecord.action == "egress.block")).all()
    assert {(r.object_type, r.actor_id) for r in blocks} == {
        ("instance", admin.user_id),
        ("patient", admin.user_id),
    }


def test_a_mail_that_cannot_be_delivered_ends_failed_after_the_retries(runtime: Runtime) -> None:
    world = _world(runtime)

    class Refusing:
        def send(self, to: str, subject: str, body: str) -> None:
            del to, subject, body
            raise MailError("SMTP delivery failed: ConnectionRefusedError")

    shares = runtime.shares
    shares.mailer = Refusing()
    object.__setattr__(shares.settings, "smtp_host", "smtp.example")
    share = _share(world, recipient_email="colleague@elsewhere.example")
    worker = runtime.new_worker()
    for _ in range(6):
        while worker.run_once():
            pass
        _advance(runtime, timedelta(seconds=40))
    listed = world.client.get(f"/api/v1/exams/{world.study.study_id}/shares", headers=world.clinician)
    (item,) = listed.json()["items"]
    assert item["id"] == share["id"]
    assert item["delivery"] == "failed"
    assert item["status"] == "pending"  # no link was ever made
    with runtime.db.transaction() as session:
        row = session.get(ShareLink, share["id"])
        assert row is not None
        assert row.token_digest is None
