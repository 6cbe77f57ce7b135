"""Quarantine review through the API (list, release with a rule, reject), the ingest policy
API, and the sweeper that removes what a crash between the pipeline's writes left behind.

The signed-in principal is supplied by overriding ``CurrentPrincipal``; ``require`` and the
service's institution scoping run for real.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom import uid as dicom_uid
from sqlalchemy import func, select

from factories.accounts import AccountsFactory
from factories.dicom_factory import make_instance, to_bytes
from phivault.accounts.permissions import Role
from phivault.accounts.principal import Principal
from phivault.audit.service import Actor, SystemSubject
from phivault.clock import ManualClock
from phivault.crypto.models import PatientKey
from phivault.crypto.service import ObjectContext
from phivault.exams.ingest import INSTANCE_KIND
from phivault.exams.models import Instance, QuarantinedInstance, Study
from phivault.exams.phi_models import PhiInstance, PhiPatient, PhiStudy
from phivault.exams.types import IngestChannel, IngestOrigin, ReceiptStatus
from phivault.http import deps
from phivault.runtime import Runtime
from phivault.web.app import create_app


@pytest.fixture
def institution(runtime: Runtime) -> str:
    return AccountsFactory(runtime).institution().id


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime), base_url="https://testserver") as test_client:
        yield test_client


def _sign_in(client: TestClient, principal: Principal) -> None:
    client.app.dependency_overrides[deps._authenticated_principal] = lambda: principal  # type: ignore[attr-defined]


def _origin(institution_id: str) -> IngestOrigin:
    return IngestOrigin(
        institution_id, SystemSubject(Actor.system("sender"), institution_id), IngestChannel.DIMSE
    )


def _quarantined(runtime: Runtime, institution: str) -> str:
    ds, _ = make_instance(sop_class=dicom_uid.SecondaryCaptureImageStorage, modality="OT", burned_in="YES")
    receipt = runtime.ingest.ingest(to_bytes(ds), _origin(institution))
    assert receipt.status is ReceiptStatus.QUARANTINED
    return receipt.instance_id


def test_an_admin_releases_a_quarantined_instance_with_a_rule(
    runtime: Runtime, client: TestClient, institution: str
) -> None:
    quarantine_id = _quarantined(runtime, institution)
    _sign_in(client, Principal.for_user("admin-1", institution, Role.INSTITUTION_ADMIN, None))
    listed = client.get("/api/v1/quarantine")
    assert listed.status_code == 200
    [item] = listed.json()["items"]
    assert (item["id"], item["reason"], item["manufacturer"]) == (
        quarantine_id,
        "no_matching_rule",
        "Acme Sonics",
    )

    rule = {"manufacturer": "acme sonics", "regions": [{"x": 0, "y": 0, "width": 64, "height": 10}]}
    released = client.post(f"/api/v1/quarantine/{quarantine_id}/release", json={"rule": rule})
    assert released.status_code == 200, released.text
    receipt = released.json()
    assert receipt["status"] == "stored"
    with runtime.db.transaction() as session:
        row = session.get(QuarantinedInstance, quarantine_id)
        assert row is not None
        assert (row.status, row.instance_id, row.object_key) == ("released", receipt["instance_id"], None)
        instance = session.get(Instance, receipt["instance_id"])
        study = session.get(Study, receipt["study_id"])
        assert instance is not None
        assert study is not None
        opened = runtime.keys.open_object(
            runtime.store,
            instance.object_key,
            session=session,
            context=ObjectContext(institution, study.patient_key_id, INSTANCE_KIND),
        )
        stored = dcmread(io.BytesIO(b"".join(opened.iter_plaintext())))
    assert stored.BurnedInAnnotation == "NO"
    assert not stored.pixel_array[:10].any(), "the rule's region is blanked"
    assert stored.pixel_array[10:].any()
    assert "113101" in [item.CodeValue for item in stored.DeidentificationMethodCodeSequence]
    assert list(runtime.store.keys("quarantine/")) == []
    again = client.post(f"/api/v1/quarantine/{quarantine_id}/release", json={"rule": rule})
    assert (again.status_code, again.json()["code"]) == (409, "quarantine_resolved")


def test_a_rule_that_does_not_match_keeps_it_in_quarantine(
    runtime: Runtime, client: TestClient, institution: str
) -> None:
    quarantine_id = _quarantined(runtime, institution)
    _sign_in(client, Principal.for_user("admin-1", institution, Role.INSTITUTION_ADMIN, None))
    rule = {"manufacturer": "Other Vendor", "regions": [{"x": 0, "y": 0, "width": 8, "height": 8}]}
    answer = client.post(f"/api/v1/quarantine/{quarantine_id}/release", json={"rule": rule})
    assert (answer.status_code, answer.json()["code"]) == (400, "pixel_rule_not_applicable")
    assert len(list(runtime.store.keys("instance/"))) == 0
    bad = client.post(f"/api/v1/quarantine/{quarantine_id}/release", json={"rule": {"regions": []}})
    assert bad.status_code == 422


def test_reject_deletes_the_bytes_and_other_tenants_see_nothing(
    runtime: Runtime, client: TestClient, institution: str
) -> None:
    quarantine_id = _quarantined(runtime, institution)
    other = AccountsFactory(runtime).institution().id
    _sign_in(client, Principal.for_user("admin-2", other, Role.INSTITUTION_ADMIN, None))
    assert client.get("/api/v1/quarantine").json()["items"] == []
    assert client.post(f"/api/v1/quarantine/{quarantine_id}/reject").status_code == 404
    _sign_in(client, Principal.for_user("clinician-1", institution, Role.CLINICIAN, None))
    assert client.get("/api/v1/quarantine").status_code == 403
    _sign_in(client, Principal.for_user("admin-1", institution, Role.INSTITUTION_ADMIN, None))
    assert client.post(f"/api/v1/quarantine/{quarantine_id}/reject").status_code == 204
    assert list(runtime.store.keys("quarantine/")) == []
    assert client.get("/api/v1/quarantine").json()["items"] == []
    assert client.get("/api/v1/quarantine?status=rejected").json()["items"][0]["id"] == quarantine_id


def test_the_policy_api_changes_what_ingest_applies(
    runtime: Runtime, client: TestClient, institution: str
) -> None:
    _sign_in(client, Principal.for_user("admin-1", institution, Role.INSTITUTION_ADMIN, None))
    assert client.get("/api/v1/ingest/policy").json()["retain_modified_dates"] is False
    rule = {"manufacturer": "Acme Sonics", "regions": [{"x": 0, "y": 0, "width": 64, "height": 4}]}
    put = client.put(
        "/api/v1/ingest/policy",
        json={"retain_modified_dates": True, "pixel_rules": [rule], "private_allow_list": []},
    )
    assert put.status_code == 200, put.text
    odd = client.put(
        "/api/v1/ingest/policy", json={"private_allow_list": [{"group": 16, "creator": "X", "element": 1}]}
    )
    assert (odd.status_code, odd.json()["code"]) == (400, "invalid_private_tag")
    ds, _ = make_instance(sop_class=dicom_uid.SecondaryCaptureImageStorage, modality="OT", burned_in="YES")
    receipt = runtime.ingest.ingest(to_bytes(ds), _origin(institution))
    assert receipt.status is ReceiptStatus.STORED, "the institution's rule covers it now"
    with runtime.db.transaction() as session:
        study = session.get(Study, receipt.study_id)
        assert study is not None
        assert study.study_date not in ("", "19000101"), "Modified Dates keeps shifted dates"


def test_the_sweeper_removes_what_a_crash_left_behind(
    runtime: Runtime, clock: ManualClock, institution: str
) -> None:
    kept = runtime.ingest.ingest(to_bytes(make_instance()[0]), _origin(institution))
    # A crash after the object and PHI rows were written, before the index commit:
    # simulated by removing the index rows of a second, committed instance.
    ds, _ = make_instance(
        study_uid="1.2.826.0.1.3680043.10.1444.7",
        series_uid="1.2.826.0.1.3680043.10.1444.7.1",
        sop_uid="1.2.826.0.1.3680043.10.1444.7.1.1",
    )
    ds.PatientID = "MRN-ORPHAN-1"
    lost = runtime.ingest.ingest(to_bytes(ds), _origin(institution))
    with runtime.db.transaction() as session:
        lost_key = session.get(Instance, lost.instance_id).object_key  # type: ignore[union-attr]
        session.query(Instance).filter(Instance.id == lost.instance_id).delete()
        from phivault.exams.models import Series  # noqa: PLC0415

        session.query(Series).filter(Series.study_id == lost.study_id).delete()
        session.query(Study).filter(Study.id == lost.study_id).delete()
    with runtime.phi_db.transaction() as phi:
        lost_patient = phi.get(PhiInstance, lost.instance_id).patient_id  # type: ignore[union-attr]

    first = runtime.sweeper.sweep()
    assert (first.objects_deleted, first.objects_noted) == (0, 1), "young orphans are only noted"
    assert first.phi_instances_deleted == 0
    clock.advance(timedelta(seconds=runtime.settings.ingest_orphan_grace_seconds + 1))
    second = runtime.sweeper.sweep()
    assert (second.objects_deleted, second.phi_instances_deleted, second.phi_studies_deleted) == (1, 1, 1)
    assert second.phi_patients_deleted == 1
    assert lost_key not in set(runtime.store.keys())
    with runtime.phi_db.transaction() as phi:
        assert phi.get(PhiPatient, lost_patient) is None
        assert phi.scalar(select(func.count()).select_from(PhiInstance)) == 1
        assert phi.scalar(select(func.count()).select_from(PhiStudy)) == 1
    with runtime.db.transaction() as session:
        keys = session.scalars(select(PatientKey).where(PatientKey.wrapped_key.is_(None))).all()
        assert len(keys) == 1, "the orphaned patient's key is shredded"
        assert session.get(Instance, kept.instance_id) is not None
    assert runtime.sweeper.sweep().objects_deleted == 0, "referenced objects stay"
