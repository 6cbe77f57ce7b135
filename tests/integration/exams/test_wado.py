"""WADO-RS through the app on SQLite and PostgreSQL: re-identified DICOM for PHI readers only,
metadata, frames cut out of native and encapsulated pixel data, rendered images without
metadata, representations, ETags.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread

from factories.accounts import LOOPBACK, bearer, problem
from factories.dicom_factory import PATIENT_ID, PATIENT_NAME, phi_left_in, to_bytes
from factories.exams import ExamsFactory, IngestedStudy, jpeg_instance, multipart_parts, stored_pixels
from phivault.accounts.permissions import Role
from phivault.audit.actions import AuditAction
from phivault.audit.models import AuditRecord
from phivault.exams.types import ReceiptStatus
from phivault.runtime import Runtime
from phivault.web.app import create_app


@dataclass
class World:
    client: TestClient
    study: IngestedStudy
    clinician: dict[str, str]
    admin: dict[str, str]
    stranger: dict[str, str]

    def url(self, index: int = 0, *, original: bool = False) -> str:
        receipt = self.study.receipts[index]
        if original:
            dataset = self.study.originals[index]
            uids = (dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
        else:
            uids = (receipt.study_instance_uid, receipt.series_instance_uid, receipt.sop_instance_uid)
        return "/dicomweb/studies/{}/series/{}/instances/{}".format(*uids)


@pytest.fixture
def world(runtime: Runtime) -> Iterator[World]:
    exams = ExamsFactory(runtime)
    home, away = exams.accounts.institution().id, exams.accounts.institution().id
    study = exams.study(home, instances=2, frames=4, rows=100, columns=80)

    def headers(role: Role, institution: str) -> dict[str, str]:
        member = exams.accounts.member(role, institution, mfa=True)
        return bearer(exams.accounts.session_for(member, mfa=True)[0])

    with TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK) as client:
        yield World(
            client,
            study,
            headers(Role.CLINICIAN, home),
            headers(Role.INSTITUTION_ADMIN, home),
            headers(Role.CLINICIAN, away),
        )


def test_clinicians_retrieve_the_instance_as_sent_others_as_stored(world: World) -> None:
    reid = world.client.get(world.url(), headers=world.clinician)
    assert reid.status_code == 200, reid.text
    assert reid.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    ((kind, data),) = multipart_parts(reid.headers["content-type"], reid.content)
    assert kind.startswith("application/dicom; transfer-syntax=1.2.840.10008.1.2.1")
    restored = dcmread(io.BytesIO(data))
    original = world.study.originals[0]
    assert (restored.PatientName, restored.PatientID) == (PATIENT_NAME, PATIENT_ID)
    assert restored.SOPInstanceUID == original.SOPInstanceUID
    assert restored.PixelData == stored_pixels(100, 80, 4, rgb=True).tobytes()

    stored = world.client.get(world.url(), headers=world.admin)
    assert stored.status_code == 200
    ((_, deidentified),) = multipart_parts(stored.headers["content-type"], stored.content)
    assert phi_left_in(deidentified, world.study.planted) == []
    assert dcmread(io.BytesIO(deidentified)).PatientIdentityRemoved == "YES"
    assert reid.headers["etag"] != stored.headers["etag"]


def test_a_study_is_every_instance_in_one_multipart_answer(world: World) -> None:
    receipt = world.study.receipts[0]
    response = world.client.get(f"/dicomweb/studies/{receipt.study_instance_uid}", headers=world.admin)
    parts = multipart_parts(response.headers["content-type"], response.content)
    assert len(parts) == 2
    numbers = sorted(int(dcmread(io.BytesIO(data)).InstanceNumber) for _, data in parts)
    assert numbers == [1, 2]
    series = world.client.get(
        f"/dicomweb/studies/{receipt.study_instance_uid}/series/{receipt.series_instance_uid}",
        headers=world.clinician,
    )
    assert len(multipart_parts(series.headers["content-type"], series.content)) == 2


def test_original_uids_address_the_study_for_phi_readers_only(world: World) -> None:
    assert world.client.get(world.url(original=True), headers=world.clinician).status_code == 200
    assert problem(world.client.get(world.url(original=True), headers=world.admin))["code"] == "not_found"


def test_another_institution_gets_404_for_every_resource(world: World) -> None:
    for suffix in ("", "/metadata", "/frames/1", "/rendered", "/frames/1/rendered"):
        response = world.client.get(world.url() + suffix, headers=world.stranger)
        assert (response.status_code, problem(response)["code"]) == (404, "not_found"), suffix


def test_representations_and_conditional_requests(world: World) -> None:
    single = world.client.get(world.url(), headers={**world.admin, "accept": "application/dicom"})
    assert single.headers["content-type"] == "application/dicom"
    assert int(single.headers["content-length"]) == len(single.content)
    refused = world.client.get(world.url(), headers={**world.admin, "accept": "application/pdf"})
    assert (refused.status_code, problem(refused)["code"]) == (406, "not_acceptable")
    other_syntax = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert world.client.get(world.url(), headers={**world.admin, "accept": other_syntax}).status_code == 406
    etag = single.headers["etag"]
    metadata = world.client.get(world.url() + "/metadata", headers=world.admin)
    assert metadata.headers["etag"] != etag, "one ETag per representation"
    again = world.client.get(world.url(), headers={**world.admin, "if-none-match": etag})
    assert (again.status_code, again.content) == (304, b"")
    assert world.client.get(world.url(), headers={**world.admin, "if-none-match": '"x"'}).status_code == 200


def test_metadata_is_reidentified_for_phi_readers_only(world: World) -> None:
    reid = world.client.get(world.url() + "/metadata", headers=world.clinician)
    assert reid.headers["content-type"] == "application/dicom+json"
    (attributes,) = reid.json()
    assert attributes["00100010"]["Value"][0]["Alphabetic"] == PATIENT_NAME
    assert "7FE00010" not in attributes
    stored = world.client.get(world.url() + "/metadata", headers=world.admin)
    assert [v for v in world.study.planted if v in stored.text] == []
    study = world.client.get(
        f"/dicomweb/studies/{world.study.receipts[0].study_instance_uid}/metadata", headers=world.admin
    )
    assert len(study.json()) == 2


def test_native_frames_are_cut_out_exactly(world: World) -> None:
    response = world.client.get(world.url() + "/frames/4,1", headers=world.admin)
    assert response.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
    parts = multipart_parts(response.headers["content-type"], response.content)
    expected = stored_pixels(100, 80, 4, rgb=True)
    assert [data for _, data in parts] == [expected[3].tobytes(), expected[0].tobytes()]
    assert parts[0][0] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    for bad, code in (("/frames/5", "frame_out_of_range"), ("/frames/0", "invalid_frame_number")):
        refused = world.client.get(world.url() + bad, headers=world.admin)
        assert (refused.status_code, problem(refused)["code"]) == (400, code)
    assert world.client.get(world.url() + "/frames/1;2", headers=world.admin).status_code == 422
    jpeg_only = world.client.get(
        world.url() + "/frames/1", headers={**world.admin, "accept": 'multipart/related; type="image/jpeg"'}
    )
    assert jpeg_only.status_code == 406


@pytest.mark.parametrize(("bot", "fragments"), [(True, 1), (False, 1), (False, 3)])
def test_encapsulated_frames_come_out_as_their_fragments(
    runtime: Runtime, *, bot: bool, fragments: int
) -> None:
    exams = ExamsFactory(runtime)
    institution = exams.accounts.institution().id
    dataset, encoded = jpeg_instance(basic_offset_table=bot, fragments_per_frame=fragments)
    receipt = runtime.ingest.ingest(to_bytes(dataset), exams.origin(institution))
    assert receipt.status is ReceiptStatus.STORED
    member = exams.accounts.member(Role.CLINICIAN, institution, mfa=True)
    headers = bearer(exams.accounts.session_for(member, mfa=True)[0])
    url = (
        f"/dicomweb/studies/{receipt.study_instance_uid}/series/{receipt.series_instance_uid}"
        f"/instances/{receipt.sop_instance_uid}"
    )
    with TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK) as client:
        response = client.get(url + "/frames/3,2", headers=headers)
        assert response.status_code == 200, response.text
        parts = multipart_parts(response.headers["content-type"], response.content)
        assert [data.rstrip(b"\0") for _, data in parts] == [
            encoded[2].rstrip(b"\0"),
            encoded[1].rstrip(b"\0"),
        ]
        assert parts[0][0] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
        rendered = client.get(url + "/frames/2/rendered", headers={**headers, "accept": "image/png"})
        assert rendered.status_code == 200, rendered.text
        image = Image.open(io.BytesIO(rendered.content))
        assert abs(float(np.asarray(image).mean()) - 60) < 3, "frame 2 (value 60), window 128/256"


def test_rendered_images_carry_pixels_and_no_metadata(world: World) -> None:
    for accept, kind in (("image/jpeg", "JPEG"), ("image/png", "PNG"), ("*/*", "JPEG")):
        response = world.client.get(world.url() + "/rendered", headers={**world.clinician, "accept": accept})
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(response.content))
        assert image.format == kind
        assert image.size == (80, 100)
        assert set(image.info) <= {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi"}
        assert phi_left_in_bytes(response.content, world.study.planted) == []
    fitted = world.client.get(
        world.url() + "/frames/2/rendered?viewport=40,40&quality=50", headers=world.admin
    )
    assert Image.open(io.BytesIO(fitted.content)).size == (32, 40)
    windowed = world.client.get(world.url() + "/rendered?window=100,50,sigmoid", headers=world.admin)
    assert windowed.status_code == 200
    for bad in ("window=1", "window=1,0", "viewport=0,10", "quality=0", "window=1,2,cubic"):
        refused = world.client.get(world.url() + "/rendered?" + bad, headers=world.admin)
        assert refused.status_code in (400, 422), bad
        assert refused.headers["content-type"] == "application/problem+json"
    assert world.client.get(world.url() + "/frames/1,2/rendered", headers=world.admin).status_code == 400
    gif = world.client.get(world.url() + "/rendered", headers={**world.admin, "accept": "image/gif"})
    assert gif.status_code == 406


def phi_left_in_bytes(data: bytes, planted: list[str]) -> list[str]:
    return [value for value in planted if value.encode() in data]


def test_every_retrieval_is_audited_with_phi_disclosures_by_patient(runtime: Runtime, world: World) -> None:
    world.client.get(world.url(), headers=world.clinician)
    world.client.get(world.url() + "/frames/1", headers=world.admin)
    with runtime.db.transaction() as session:
        rows = session.query(AuditRecord.action, AuditRecord.object_type).all()
    actions = [(action, kind) for action, kind in rows if action.startswith(("exam.", "phi."))]
    assert (AuditAction.EXAM_DOWNLOAD.value, "instance") in actions
    assert (AuditAction.PHI_READ.value, "patient") in actions
    assert (AuditAction.EXAM_VIEW.value, "instance") in actions
    assert sum(action == AuditAction.PHI_READ.value for action, _ in actions) == 1, "the admin read no PHI"
