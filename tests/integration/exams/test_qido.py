"""QIDO-RS through the app on SQLite and PostgreSQL: PHI keys matched by blind index for PHI
readers, pseudonyms for everyone else, PS3.18 paging and errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from factories.accounts import LOOPBACK, bearer, problem
from factories.dicom_factory import ISSUER, PATIENT_ID, PATIENT_NAME
from factories.exams import ExamsFactory, IngestedStudy
from phivault.accounts.permissions import Role
from phivault.audit.actions import AuditAction
from phivault.audit.models import AuditRecord
from phivault.exams.models import Study
from phivault.exams.reading import PATIENT_FIELDS
from phivault.runtime import Runtime
from phivault.web.app import create_app

ROOT = "1.2.826.0.1.3680043.10.1444.50"


@dataclass
class World:
    client: TestClient
    studies: dict[str, IngestedStudy]
    clinician: dict[str, str]
    admin: dict[str, str]
    stranger: dict[str, str]

    def search(
        self, query: str, headers: dict[str, str] | None = None, path: str = "/dicomweb/studies"
    ) -> Any:  # noqa: ANN401  # DICOM JSON
        response = self.client.get(f"{path}?{query}" if query else path, headers=headers or self.clinician)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/dicom+json"
        return response.json()

    def names(self, query: str, headers: dict[str, str] | None = None) -> list[str]:
        """Which studies (A, B, C, D) a study search finds, by their original UID."""
        by_uid = {study.originals[0].StudyInstanceUID: name for name, study in self.studies.items()}
        by_uid |= {study.study_uid: name for name, study in self.studies.items()}
        return sorted(by_uid[item["0020000D"]["Value"][0]] for item in self.search(query, headers))

    def refused(
        self, query: str, headers: dict[str, str] | None = None, path: str = "/dicomweb/studies"
    ) -> str:
        response = self.client.get(f"{path}?{query}", headers=headers or self.clinician)
        assert response.status_code == 400, response.text
        code: str = problem(response)["code"]
        return code


@pytest.fixture
def world(runtime: Runtime) -> Iterator[World]:
    exams = ExamsFactory(runtime)
    home, away = exams.accounts.institution().id, exams.accounts.institution().id
    studies = {
        "A": exams.study(
            home,
            study_uid=f"{ROOT}.1",
            instances=1,
            patch={"StudyDate": "20240105", "AccessionNumber": "ACC-A1"},
        ),
        "B": exams.study(
            home,
            study_uid=f"{ROOT}.2",
            instances=2,
            patch={"StudyDate": "20240220", "AccessionNumber": "ACC-B2"},
        ),
        "C": exams.study(
            home,
            study_uid=f"{ROOT}.3",
            instances=1,
            modality="OT",
            patch={
                "PatientName": "Óbrecht^Anna",
                "PatientID": "MRN-5555",
                "IssuerOfPatientID": "OTHER-HOSPITAL",
                "StudyDate": "20231231",
                "AccessionNumber": "ACC-C3",
            },
        ),
        "D": exams.study(
            home,
            study_uid=f"{ROOT}.4",
            instances=1,
            patch={
                "PatientName": "Quixworth^Albert",
                "IssuerOfPatientID": "OTHER-HOSPITAL",
                "StudyDate": "20220101",
            },
        ),
    }
    exams.study(away, study_uid=f"{ROOT}.9", instances=1)

    def headers(role: Role, institution: str) -> dict[str, str]:
        member = exams.accounts.member(role, institution, mfa=True)
        return bearer(exams.accounts.session_for(member, mfa=True)[0])

    with TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK) as client:
        yield World(
            client,
            studies,
            headers(Role.CLINICIAN, home),
            headers(Role.INSTITUTION_ADMIN, home),
            headers(Role.CLINICIAN, away),
        )


def test_patient_id_matches_by_blind_index_with_or_without_issuer(world: World) -> None:
    assert world.names(f"PatientID={PATIENT_ID}") == ["A", "B", "D"]
    assert world.names(f"PatientID={PATIENT_ID}&IssuerOfPatientID={ISSUER}") == ["A", "B"]
    assert world.names("PatientID=MRN-5555&IssuerOfPatientID=OTHER-HOSPITAL") == ["C"]
    assert world.names("PatientID=MRN-0000") == []
    assert world.refused("PatientID=MRN*") == "unsupported_matching"


NAME_PATTERNS: tuple[tuple[str, list[str]], ...] = (
    ("Quix*", ["A", "B", "D"]),
    (PATIENT_NAME, ["A", "B"]),
    ("QUIXWORTH^ZELPHINE^MARGUERITE", ["A", "B"]),
    ("Quixworth^A*", ["D"]),
    ("*brecht*", ["C"]),
    ("obrecht^anna", ["C"]),
    ("*^Zel*", ["A", "B"]),
    ("Quixworth", []),
    ("*", ["A", "B", "C", "D"]),
)


def test_patient_name_wildcards(world: World) -> None:
    found = {pattern: world.names(f"PatientName={pattern}") for pattern, _ in NAME_PATTERNS}
    assert found == dict(NAME_PATTERNS)


def test_fuzzy_patient_names_and_patterns_too_broad(world: World) -> None:
    assert world.names("PatientName=Quixwerth&fuzzymatching=true") == ["A", "B", "D"]
    assert world.names("PatientName=Obrekt^Ana&fuzzymatching=true") == ["C"]
    assert world.refused("PatientName=*a*") == "query_too_broad"


def test_study_date_ranges_accession_modalities_and_uids(world: World) -> None:
    assert world.names("StudyDate=20240101-20240131") == ["A"]
    assert world.names("StudyDate=20231231") == ["C"]
    assert world.names("StudyDate=20231201-20240301") == ["A", "B", "C"]
    assert world.refused("StudyDate=20240101-") == "date_range_too_wide"  # to "today": 2026-01-01
    assert world.refused("StudyDate=-20240101") == "date_range_too_wide"
    assert world.refused("StudyDate=20200101-20221231") == "date_range_too_wide"
    assert world.names("AccessionNumber=ACC-B2") == ["B"]
    assert world.names("AccessionNumber=ACC-B2&PatientID=MRN-5555") == []
    assert world.names("ModalitiesInStudy=OT") == ["C"]
    assert world.names("ModalitiesInStudy=OT,US") == ["A", "B", "C", "D"]
    a = world.studies["A"]
    assert world.names(f"StudyInstanceUID={a.originals[0].StudyInstanceUID}") == ["A"]
    assert world.names(f"StudyInstanceUID={a.study_uid},{world.studies['C'].study_uid}") == ["A", "C"]


def test_phi_readers_get_phi_and_original_uids(world: World) -> None:
    (answer,) = world.search(f"PatientID={PATIENT_ID}&IssuerOfPatientID={ISSUER}&StudyDate=20240105")
    assert answer["00100010"]["Value"][0]["Alphabetic"] == PATIENT_NAME
    assert answer["00080050"]["Value"] == ["ACC-A1"]
    assert answer["00080020"]["Value"] == ["20240105"]
    assert answer["0020000D"]["Value"] == [f"{ROOT}.1"]
    assert answer["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{ROOT}.1")
    assert answer["00201208"]["Value"] == [1]
    series = world.search("", path=f"/dicomweb/studies/{ROOT}.1/series")
    assert series[0]["0020000E"]["Value"] == [f"{ROOT}.1.1"]
    instances = world.search("", path=f"/dicomweb/studies/{ROOT}.2/series/{ROOT}.2.1/instances")
    assert sorted(item["00080018"]["Value"][0] for item in instances) == [f"{ROOT}.2.1.1", f"{ROOT}.2.1.2"]


def test_readers_without_phi_read_see_and_match_pseudonyms_only(world: World) -> None:
    answers = world.search("", world.admin)
    assert len(answers) == 4
    text = str(answers)
    planted = {value for study in world.studies.values() for value in study.planted}
    assert [value for value in planted if value in text] == []
    pseudonym = answers[0]["00100020"]["Value"][0]
    assert answers[0]["00100010"]["Value"][0]["Alphabetic"] == pseudonym
    assert all(item["0020000D"]["Value"][0].startswith("2.25.") for item in answers)
    same_patient = world.search(f"PatientID={pseudonym}", world.admin)
    assert {item["00100020"]["Value"][0] for item in same_patient} == {pseudonym}
    assert world.search(f"PatientID={PATIENT_ID}", world.admin) == []
    assert world.search("StudyDate=20240101-20240131", world.admin) == []  # dates are removed
    for key in ("AccessionNumber=ACC-A1", "PatientBirthDate=19470312", f"IssuerOfPatientID={ISSUER}"):
        assert world.refused(key, world.admin) == "phi_query_not_permitted"
    instances = world.search("", world.admin, path="/dicomweb/instances")
    assert all(item["00080018"]["Value"][0].startswith("2.25.") for item in instances)


def test_paging_includefield_and_warnings(world: World) -> None:
    first = world.client.get("/dicomweb/studies?limit=3", headers=world.clinician)
    assert len(first.json()) == 3
    assert "more results" in first.headers["warning"]
    rest = world.client.get("/dicomweb/studies?limit=3&offset=3", headers=world.clinician)
    assert len(rest.json()) == 1
    assert "warning" not in rest.headers
    ids = {item["0020000D"]["Value"][0] for item in first.json() + rest.json()}
    assert len(ids) == 4
    (narrow,) = world.search(f"StudyInstanceUID={ROOT}.1")
    assert "00081030" not in narrow
    (wide,) = world.search(f"StudyInstanceUID={ROOT}.1&includefield=StudyDescription")
    assert "00081030" in wide
    (everything,) = world.search(f"StudyInstanceUID={ROOT}.1&includefield=all")
    assert "00100021" in everything
    ignored = world.client.get("/dicomweb/studies?StudyTime=1200", headers=world.clinician)
    assert ignored.status_code == 200
    assert "StudyTime" in ignored.headers["warning"]


INVALID = (
    ("limit=0", "invalid_query_parameter"),
    ("limit=abc", "invalid_query_parameter"),
    ("limit=100000", "invalid_query_parameter"),
    ("offset=-1", "invalid_query_parameter"),
    ("Bogus=1", "unknown_attribute"),
    ("includefield=Nonsense", "unknown_attribute"),
    ("FFFFFFF0=1", "unknown_attribute"),
    ("fuzzymatching=maybe", "invalid_query_parameter"),
    ("StudyDate=2024", "invalid_query_parameter"),
    ("StudyDate=20240231", "invalid_query_parameter"),
    ("StudyDate=20240301-20240101", "invalid_query_parameter"),
    ("StudyInstanceUID=abc", "invalid_query_parameter"),
    ("PatientID=1&PatientID=2", "invalid_query_parameter"),
    ("ModalitiesInStudy=U%25S", "invalid_query_parameter"),
    ("PatientName=" + "*ab" * 9, "invalid_query_parameter"),
    ("PatientName=" + "x" * 201, "invalid_query_parameter"),
)


def test_invalid_parameters_are_400_problems(world: World) -> None:
    assert {query: world.refused(query) for query, _ in INVALID} == dict(INVALID)


def test_unknown_and_foreign_studies_are_404(world: World) -> None:
    for path in (
        f"/dicomweb/studies/{ROOT}.77/series",
        f"/dicomweb/studies/{ROOT}.1/series/{ROOT}.77/instances",
    ):
        response = world.client.get(path, headers=world.clinician)
        assert (response.status_code, problem(response)["code"]) == (404, "not_found")
    foreign = world.client.get(f"/dicomweb/studies/{ROOT}.1/series", headers=world.stranger)
    assert foreign.status_code == 404
    assert world.search("", world.stranger) != []
    assert {item["0020000D"]["Value"][0] for item in world.search("", world.stranger)} == {f"{ROOT}.9"}
    xml = world.client.get(
        "/dicomweb/studies", headers={**world.clinician, "accept": "application/dicom+xml"}
    )
    assert xml.status_code == 406


def test_archived_studies_are_hidden_unless_named(runtime: Runtime, world: World) -> None:
    with runtime.db.transaction() as session:
        study = session.get(Study, world.studies["C"].study_id)
        assert study is not None
        study.archived_at = runtime.clock.now()
    assert world.names("") == ["A", "B", "D"]
    assert world.names(f"StudyInstanceUID={ROOT}.3") == ["C"]


def test_series_and_instance_level_keys(world: World) -> None:
    series = world.search("Modality=OT", path="/dicomweb/series")
    assert [item["0020000D"]["Value"][0] for item in series] == [f"{ROOT}.3"]
    assert series[0]["00100010"]["Value"][0]["Alphabetic"] == "Óbrecht^Anna"
    instances = world.search(f"SOPInstanceUID={ROOT}.2.1.2", path="/dicomweb/instances")
    assert [item["00080018"]["Value"][0] for item in instances] == [f"{ROOT}.2.1.2"]
    numbered = world.search("InstanceNumber=2", path=f"/dicomweb/studies/{ROOT}.2/instances")
    assert [item["00080018"]["Value"][0] for item in numbered] == [f"{ROOT}.2.1.2"]
    assert world.refused("SeriesNumber=x", path="/dicomweb/series") == "invalid_query_parameter"


def test_searches_narrowed_by_phi_keys_page_in_the_order_of_unnarrowed_ones(world: World) -> None:
    # Narrowed searches order their candidates outside the database (search._few_studies).
    everyone = [item["0020000D"]["Value"][0] for item in world.search("")]
    narrowed = [f"{ROOT}.1", f"{ROOT}.2", f"{ROOT}.3"]
    expected = [uid for uid in everyone if uid in narrowed]
    pages = [world.search(f"StudyDate=20231201-20240301&limit=1&offset={n}") for n in range(4)]
    assert [item["0020000D"]["Value"][0] for page in pages for item in page] == expected
    by_patient = [world.search(f"PatientID={PATIENT_ID}&limit=2&offset={n}") for n in (0, 2)]
    expected = [uid for uid in everyone if uid in (f"{ROOT}.1", f"{ROOT}.2", f"{ROOT}.4")]
    assert [item["0020000D"]["Value"][0] for page in by_patient for item in page] == expected


def test_patient_fields_are_opened_only_when_the_answer_keeps_them(runtime: Runtime, world: World) -> None:
    a = world.studies["A"]
    (default,) = world.search(f"StudyInstanceUID={ROOT}.1")
    assert "00100021" not in default
    assert default["00100010"]["Value"][0]["Alphabetic"] == PATIENT_NAME
    (included,) = world.search(f"StudyInstanceUID={ROOT}.1&includefield=IssuerOfPatientID")
    assert included["00100021"]["Value"] == [ISSUER]
    (matched,) = world.search(f"StudyInstanceUID={ROOT}.1&IssuerOfPatientID={ISSUER}")
    assert matched["00100021"]["Value"] == [ISSUER]
    reader = runtime.reading
    with runtime.db.transaction() as session, runtime.phi_db.read() as phi_session:
        study = session.get(Study, a.study_id)
        assert study is not None
        names_only = reader.phi_of(session, phi_session, [study], patient_fields=["patient_name"])
        everything = reader.phi_of(session, phi_session, [study])
        with pytest.raises(ValueError, match="not patient fields"):
            reader.phi_of(session, phi_session, [study], patient_fields=["PatientName"])
    patient = names_only.patient(study.patient_ref)
    assert (patient.patient_name, patient.patient_id, patient.issuer_of_patient_id) == (PATIENT_NAME, "", "")
    opened = everything.patient(study.patient_ref)
    assert [getattr(opened, name) != "" for name in PATIENT_FIELDS] == [True] * len(PATIENT_FIELDS)
    assert names_only.study(study.id) == everything.study(study.id)


def test_every_search_is_audited_with_one_phi_read_per_patient_answered(
    runtime: Runtime, world: World
) -> None:
    def events() -> list[tuple[str, str | None]]:
        with runtime.db.transaction() as session:
            rows = session.query(AuditRecord.action, AuditRecord.object_id).order_by(AuditRecord.seq).all()
        return [(action, object_id) for action, object_id in rows if action.startswith(("exam.", "phi."))]

    before = len(events())
    world.search("StudyDate=20231201-20240301")  # A, B (one patient) and C (another)
    with runtime.db.transaction() as session:
        refs = {
            session.get(Study, world.studies[name].study_id).patient_ref  # type: ignore[union-attr]
            for name in "ABC"
        }
    new = events()[before:]
    assert new[0] == (AuditAction.EXAM_SEARCH.value, None)
    assert sorted(new[1:]) == sorted((AuditAction.PHI_READ.value, ref) for ref in refs)
    assert len(refs) == 2
    world.search("", world.admin)  # pseudonyms only: no PHI disclosed
    assert events()[before + len(new) :] == [(AuditAction.EXAM_SEARCH.value, None)]
