"""The exam API on SQLite and PostgreSQL: list and detail, comments, archive, legal hold,
deletion with retention and crypto-shredding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from factories.accounts import LOOPBACK, bearer, problem
from factories.dicom_factory import PATIENT_ID, PATIENT_NAME
from factories.exams import ExamsFactory, IngestedStudy
from phivault.accounts.permissions import Role
from phivault.audit.actions import AuditAction
from phivault.audit.models import AuditRecord
from phivault.clock import ManualClock
from phivault.config.settings import Settings
from phivault.crypto.models import PatientKey, PurgeLedgerEntry
from phivault.exams.models import ExamComment, Instance, Study
from phivault.exams.phi_models import PhiInstance, PhiPatient, PhiPatientToken, PhiStudy
from phivault.runtime import Runtime, build_runtime, initialise
from phivault.web.app import create_app

ROOT = "1.2.826.0.1.3680043.10.1444.60"


@dataclass
class World:
    runtime: Runtime
    client: TestClient
    first: IngestedStudy
    second: IngestedStudy  # the same patient's other exam
    clinician: dict[str, str]
    colleague: dict[str, str]
    admin: dict[str, str]
    stranger: dict[str, str]


@pytest.fixture
def world(runtime: Runtime) -> Iterator[World]:
    exams = ExamsFactory(runtime)
    home, away = exams.accounts.institution().id, exams.accounts.institution().id
    first = exams.study(home, study_uid=f"{ROOT}.1", instances=2)
    second = exams.study(home, study_uid=f"{ROOT}.2", instances=1)

    def headers(role: Role, institution: str) -> dict[str, str]:
        member = exams.accounts.member(role, institution, mfa=True)
        return bearer(exams.accounts.session_for(member, mfa=True)[0])

    with TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK) as client:
        yield World(
            runtime,
            client,
            first,
            second,
            headers(Role.CLINICIAN, home),
            headers(Role.CLINICIAN, home),
            headers(Role.INSTITUTION_ADMIN, home),
            headers(Role.CLINICIAN, away),
        )


def test_list_and_detail_show_phi_to_phi_readers_only(world: World) -> None:
    listed = world.client.get("/api/v1/exams", headers=world.clinician).json()
    by_id = {item["id"]: item for item in listed["items"]}
    assert set(by_id) == {world.second.study_id, world.first.study_id}
    assert by_id[world.second.study_id]["phi"]["patient_name"] == PATIENT_NAME
    assert by_id[world.second.study_id]["phi"]["study_instance_uid"] == f"{ROOT}.2"
    detail = world.client.get(f"/api/v1/exams/{world.first.study_id}", headers=world.clinician).json()
    assert (detail["number_of_instances"], len(detail["series"]), detail["comments"]) == (2, 1, 0)
    assert detail["phi"]["patient_id"] == PATIENT_ID
    for who in (world.admin,):
        text = world.client.get("/api/v1/exams", headers=who).text
        text += world.client.get(f"/api/v1/exams/{world.first.study_id}", headers=who).text
        assert [value for value in world.first.planted if value in text] == []
        assert '"phi":null' in text
    paged = world.client.get("/api/v1/exams?limit=1", headers=world.clinician).json()
    assert (len(paged["items"]), paged["next_offset"]) == (1, 1)
    mine = world.client.get(f"/api/v1/exams?patient_id={PATIENT_ID}", headers=world.clinician).json()
    assert len(mine["items"]) == 2
    assert world.client.get(f"/api/v1/exams?patient_id={PATIENT_ID}", headers=world.admin).status_code == 403
    assert world.client.get("/api/v1/exams?modality=CT", headers=world.clinician).json()["items"] == []
    for window, found in (
        ("created_from=2025-12-31T00:00:00", 2),
        ("created_to=2025-12-31T00:00:00%2B00:00", 0),
    ):
        answer = world.client.get(f"/api/v1/exams?{window}", headers=world.clinician)
        assert len(answer.json()["items"]) == found, answer.text
    assert world.client.get("/api/v1/exams?modality=U%25", headers=world.clinician).status_code == 400
    assert world.client.get("/api/v1/exams", headers=world.stranger).json()["items"] == []
    foreign = world.client.get(f"/api/v1/exams/{world.first.study_id}", headers=world.stranger)
    assert (foreign.status_code, problem(foreign)["code"]) == (404, "not_found")


def test_archived_exams_are_hidden_by_default_and_kept(world: World) -> None:
    exam = world.first.study_id
    archived = world.client.post(f"/api/v1/exams/{exam}/archive", headers=world.clinician)
    assert archived.json()["archived_at"] is not None
    ids = [item["id"] for item in world.client.get("/api/v1/exams", headers=world.clinician).json()["items"]]
    assert ids == [world.second.study_id]
    everything = world.client.get("/api/v1/exams?archived=true", headers=world.clinician).json()["items"]
    assert {item["id"] for item in everything} == {exam, world.second.study_id}
    assert world.client.get(f"/api/v1/exams/{exam}", headers=world.clinician).status_code == 200
    retrieve = world.client.get(f"/dicomweb/studies/{world.first.study_uid}", headers=world.admin)
    assert retrieve.status_code == 200
    assert (
        world.client.delete(f"/api/v1/exams/{exam}/archive", headers=world.admin).json()["archived_at"]
        is None
    )
    with world.runtime.db.transaction() as session:
        actions = list(session.scalars(select(AuditRecord.action).where(AuditRecord.object_id == exam)))
    assert AuditAction.EXAM_ARCHIVE.value in actions
    assert AuditAction.EXAM_UNARCHIVE.value in actions
    assert AuditAction.EXAM_VIEW.value in actions


def test_comments_are_sealed_and_edited_by_their_authors_only(world: World) -> None:
    exam = world.first.study_id
    created = world.client.post(
        f"/api/v1/exams/{exam}/comments", headers=world.clinician, json={"body": "Zelphine: no findings"}
    )
    assert created.status_code == 201
    comment = created.json()
    assert (comment["body"], comment["own"]) == ("Zelphine: no findings", True)
    with world.runtime.db.transaction() as session:
        row = session.get(ExamComment, comment["id"])
        assert row is not None
        assert b"Zelphine" not in row.body
    for who, body in ((world.colleague, "Zelphine: no findings"), (world.admin, None)):
        (seen,) = world.client.get(f"/api/v1/exams/{exam}/comments", headers=who).json()["items"]
        assert (seen["body"], seen["own"]) == (body, False)
    url = f"/api/v1/exams/{exam}/comments/{comment['id']}"
    for method in ("patch", "delete"):
        refused = world.client.request(
            method.upper(), url, headers=world.colleague, json={"body": "mine now"}
        )
        assert (refused.status_code, problem(refused)["code"]) == (403, "not_comment_author")
    edited = world.client.patch(url, headers=world.clinician, json={"body": "edited"})
    assert edited.json()["body"] == "edited"
    assert world.client.get(f"/api/v1/exams/{exam}", headers=world.clinician).json()["comments"] == 1
    assert world.client.delete(url, headers=world.clinician).status_code == 204
    assert world.client.delete(url, headers=world.clinician).status_code == 404
    too_long = world.client.post(
        f"/api/v1/exams/{exam}/comments", headers=world.clinician, json={"body": "x" * 4001}
    )
    assert too_long.status_code == 422
    assert (
        world.client.post(
            f"/api/v1/exams/{exam}/comments", headers=world.admin, json={"body": "x"}
        ).status_code
        == 403
    )
    with world.runtime.db.transaction() as session:
        actions = set(session.scalars(select(AuditRecord.action).where(AuditRecord.object_type == "comment")))
    assert actions == {
        AuditAction.EXAM_COMMENT_CREATE.value,
        AuditAction.EXAM_COMMENT_UPDATE.value,
        AuditAction.EXAM_COMMENT_DELETE.value,
    }


def _counts(runtime: Runtime, study_id: str) -> tuple[int, int, int]:
    with runtime.db.transaction() as session:
        instances = session.scalar(
            select(func.count()).select_from(Instance).where(Instance.study_id == study_id)
        )
    with runtime.phi_db.transaction() as phi:
        phi_instances = phi.scalar(
            select(func.count()).select_from(PhiInstance).where(PhiInstance.study_id == study_id)
        )
        phi_studies = phi.scalar(select(func.count()).select_from(PhiStudy).where(PhiStudy.id == study_id))
    return int(instances or 0), int(phi_instances or 0), int(phi_studies or 0)


@pytest.fixture
def retaining(settings: Settings, clock: ManualClock) -> Iterator[Runtime]:
    """A deployment that keeps exams at least 30 days."""
    built = build_runtime(settings.model_copy(update={"exam_retention_days": 30}), clock=clock)
    initialise(built)
    yield built
    built.close()


def test_delete_respects_legal_hold_and_retention_then_shreds_the_emptied_patient(
    retaining: Runtime, clock: ManualClock
) -> None:
    runtime = retaining
    exams = ExamsFactory(runtime)
    home = exams.accounts.institution().id
    first = exams.study(home, study_uid=f"{ROOT}.1", instances=2)
    second = exams.study(home, study_uid=f"{ROOT}.2", instances=1)
    admin = bearer(
        exams.accounts.session_for(exams.accounts.member(Role.INSTITUTION_ADMIN, home, mfa=True))[0]
    )
    clinician = bearer(exams.accounts.session_for(exams.accounts.member(Role.CLINICIAN, home, mfa=True))[0])
    with TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK) as client:
        url = f"/api/v1/exams/{first.study_id}"
        assert client.delete(url, headers=clinician).status_code == 403
        early = client.delete(url, headers=admin)
        assert (early.status_code, problem(early)["code"]) == (409, "retention_period")
        clock.advance(timedelta(days=31))
        admin = bearer(
            exams.accounts.session_for(exams.accounts.member(Role.INSTITUTION_ADMIN, home, mfa=True))[0]
        )
        assert client.put(url + "/legal-hold", headers=admin).json()["legal_hold_at"] is not None
        held = client.delete(url, headers=admin)
        assert (held.status_code, problem(held)["code"]) == (409, "legal_hold")
        assert client.delete(url + "/legal-hold", headers=admin).json()["legal_hold_at"] is None
        keys_before = set(runtime.store.keys())
        assert client.delete(url, headers=admin).status_code == 204
        assert client.get(url, headers=admin).status_code == 404
        assert _counts(runtime, first.study_id) == (0, 0, 0)
        assert len(keys_before - set(runtime.store.keys())) == 2
        with runtime.db.transaction() as session:
            study = session.get(Study, second.study_id)
            assert study is not None
            key = session.get(PatientKey, study.patient_key_id)
            assert key is not None
            assert key.wrapped_key is not None, "the patient still has an exam: the key stays"
        # The patient's last exam: the key is destroyed, the PHI rows and tokens go.
        assert (
            client.delete(
                f"/api/v1/exams/{second.study_id}?reason=erasure_request", headers=admin
            ).status_code
            == 204
        )
        with runtime.db.transaction() as session:
            key = session.get(PatientKey, study.patient_key_id)
            assert key is not None
            assert key.wrapped_key is None
            ledger = session.scalars(select(PurgeLedgerEntry.reason)).all()
            assert list(ledger) == ["erasure_request"]
        with runtime.phi_db.transaction() as phi:
            assert phi.scalar(select(func.count()).select_from(PhiPatient)) == 0
            assert phi.scalar(select(func.count()).select_from(PhiPatientToken)) == 0
        assert [key for key in runtime.store.keys() if key.startswith("instance/")] == []  # noqa: SIM118  # an ObjectStore
        with runtime.db.transaction() as session:
            actions = set(
                session.scalars(select(AuditRecord.action).where(AuditRecord.object_id == first.study_id))
            )
        assert {
            AuditAction.EXAM_LEGAL_HOLD.value,
            AuditAction.EXAM_LEGAL_HOLD_RELEASE.value,
            AuditAction.EXAM_DELETE.value,
        } <= actions
