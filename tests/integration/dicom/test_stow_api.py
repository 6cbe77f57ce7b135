"""STOW-RS through the app (in-process), on SQLite and PostgreSQL: the Store Instances
Response per PS3.18 §10.5.3, and a stable problem for every request it cannot read.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import anyio
import pytest
from fastapi.testclient import TestClient
from pydicom import uid as dicom_uid
from sqlalchemy import func, select

from factories.accounts import AccountsFactory, bearer, problem
from factories.dicom_factory import make_instance, to_bytes
from factories.dicomweb import (
    CONTENT_TYPE,
    ERROR_COMMENT,
    FAILED_SOP_SEQUENCE,
    FAILURE_REASON,
    OTHER_FAILURES_SEQUENCE,
    REFERENCED_SOP_SEQUENCE,
    RETRIEVE_URL,
    SOP_CLASS,
    SOP_INSTANCE,
    WARNING_REASON,
    items,
    multipart,
    value,
)
from phivault.accounts.permissions import Role
from phivault.audit.actions import AuditAction
from phivault.audit.models import AuditRecord
from phivault.audit.service import Actor, SystemSubject
from phivault.clock import ManualClock
from phivault.config.settings import Settings
from phivault.dicom.multipart import MultipartError
from phivault.dicom.stow import StowLimits, StowService
from phivault.exams.models import IngestPolicy, Instance, QuarantinedInstance
from phivault.exams.types import IngestChannel, IngestOrigin
from phivault.runtime import Runtime, build_runtime, initialise

STUDY = "1.2.826.0.1.3680043.10.1444.7"
DICOM_JSON = "application/dicom+json"


def _uid(n: int, study: str = STUDY) -> dict[str, str]:
    return {"study_uid": study, "series_uid": f"{study}.1", "sop_uid": f"{study}.1.{n}"}


def _instance(n: int, study: str = STUDY, **kwargs: object) -> bytes:
    dataset, _ = make_instance(**_uid(n, study), **kwargs)  # type: ignore[arg-type]
    return to_bytes(dataset)


@pytest.fixture
def clinician(factory: AccountsFactory) -> tuple[str, str]:
    """(institution id, access token) of a signed-in clinician."""
    institution = factory.institution().id
    member = factory.member(Role.CLINICIAN, institution)
    token, _ = factory.session_for(member)
    return institution, token


def _post(
    client: TestClient,
    token: str,
    body: bytes,
    *,
    path: str = "/dicomweb/studies",
    content_type: str = CONTENT_TYPE,
    accept: str = DICOM_JSON,
) -> object:
    return client.post(
        path,
        content=body,
        headers={**bearer(token), "Content-Type": content_type, "Accept": accept},
    )


def test_stored_instances_are_referenced_by_their_sent_uids_with_retrieve_urls_of_the_new_ones(
    client: TestClient, runtime: Runtime, clinician: tuple[str, str]
) -> None:
    institution, token = clinician
    single = _instance(1)
    cine = _instance(2, sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, frames=6)
    response = client.post(
        "/dicomweb/studies",
        content=multipart(single, cine),
        headers={**bearer(token), "Content-Type": CONTENT_TYPE, "Accept": DICOM_JSON},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == DICOM_JSON
    body = response.json()
    assert FAILED_SOP_SEQUENCE not in body
    stored = items(body, REFERENCED_SOP_SEQUENCE)
    assert [value(item, SOP_INSTANCE) for item in stored] == [_uid(1)["sop_uid"], _uid(2)["sop_uid"]]
    assert value(stored[1], SOP_CLASS) == dicom_uid.UltrasoundMultiFrameImageStorage
    with runtime.db.transaction() as session:
        rows = session.scalars(select(Instance).order_by(Instance.created_at)).all()
        assert {row.institution_id for row in rows} == {institution}
        assert {row.channel for row in rows} == {"stow"}
        new_uids = {row.sop_instance_uid for row in rows}
    for item in stored:
        url = value(item, RETRIEVE_URL)
        assert url.startswith(runtime.settings.public_url + "/dicomweb/studies/2.25.")
        assert url.rsplit("/", 1)[1] in new_uids  # the de-identified UID, not the one sent
        assert STUDY not in url


def test_a_resent_instance_is_stored_once_and_answered_alike(
    client: TestClient, runtime: Runtime, clinician: tuple[str, str]
) -> None:
    _, token = clinician
    first = client.post(
        "/dicomweb/studies",
        content=multipart(_instance(1)),
        headers={**bearer(token), "Content-Type": CONTENT_TYPE},
    )
    again = client.post(
        "/dicomweb/studies",
        content=multipart(_instance(1)),
        headers={**bearer(token), "Content-Type": CONTENT_TYPE},
    )
    assert (first.status_code, again.status_code) == (200, 200)
    assert first.json() == again.json()
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1


def test_refused_instances_are_listed_with_failure_reason_and_code_beside_the_stored_ones(
    client: TestClient, runtime: Runtime, clinician: tuple[str, str]
) -> None:
    _, token = clinician
    ids = _uid(3)
    missing_uid, _ = make_instance(
        study_uid=ids["study_uid"], series_uid=ids["series_uid"], sop_uid=ids["sop_uid"]
    )
    del missing_uid.SeriesInstanceUID
    response = client.post(
        "/dicomweb/studies",
        content=multipart(_instance(1), b"not a DICOM file at all", to_bytes(missing_uid)),
        headers={**bearer(token), "Content-Type": CONTENT_TYPE},
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert len(items(body, REFERENCED_SOP_SEQUENCE)) == 1
    (failed,) = items(body, FAILED_SOP_SEQUENCE)
    assert (value(failed, FAILURE_REASON), value(failed, ERROR_COMMENT)) == (0xA900, "dicom_missing_uid")
    assert value(failed, SOP_INSTANCE) == _uid(3)["sop_uid"]
    # Unreadable: no UIDs to name it by, so not a Failed SOP Sequence item (its UIDs are Type 1).
    (unnamed,) = items(body, OTHER_FAILURES_SEQUENCE)
    assert (value(unnamed, FAILURE_REASON), value(unnamed, ERROR_COMMENT)) == (0xC000, "dicom_not_dicom")
    assert SOP_INSTANCE not in unnamed
    with runtime.db.transaction() as session:
        rejects = session.scalars(
            select(AuditRecord.object_id).where(AuditRecord.action == AuditAction.INSTANCE_REJECT.value)
        ).all()
    assert sorted(reject or "" for reject in rejects) == ["dicom_missing_uid", "dicom_not_dicom"]


def test_nothing_stored_answers_409_with_the_failures(client: TestClient, clinician: tuple[str, str]) -> None:
    _, token = clinician
    unsupported = _instance(1, sop_class="1.2.840.10008.5.1.4.1.1.88.11", modality="SR")
    response = client.post(
        "/dicomweb/studies",
        content=multipart(unsupported),
        headers={**bearer(token), "Content-Type": CONTENT_TYPE},
    )
    assert response.status_code == 409, response.text
    (item,) = items(response.json(), FAILED_SOP_SEQUENCE)
    assert (value(item, FAILURE_REASON), value(item, ERROR_COMMENT)) == (
        0x0122,
        "dicom_unsupported_sop_class",
    )
    assert REFERENCED_SOP_SEQUENCE not in response.json()


def test_a_quarantined_instance_is_accepted_with_a_warning_and_no_retrieve_url(
    client: TestClient, runtime: Runtime, clinician: tuple[str, str]
) -> None:
    _, token = clinician
    burned = _instance(1, sop_class=dicom_uid.SecondaryCaptureImageStorage, modality="OT", burned_in="YES")
    response = client.post(
        "/dicomweb/studies",
        content=multipart(burned),
        headers={**bearer(token), "Content-Type": CONTENT_TYPE},
    )
    assert response.status_code == 202, response.text
    (item,) = items(response.json(), REFERENCED_SOP_SEQUENCE)
    assert (value(item, WARNING_REASON), value(item, ERROR_COMMENT)) == (0xB000, "quarantined")
    assert RETRIEVE_URL not in item
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(QuarantinedInstance)) == 1


def test_the_study_in_the_url_refuses_instances_of_other_studies(
    client: TestClient, runtime: Runtime, clinician: tuple[str, str]
) -> None:
    _, token = clinician
    other = _instance(9, study="1.2.826.0.1.3680043.10.1444.8")
    response = client.post(
        f"/dicomweb/studies/{STUDY}",
        content=multipart(_instance(1), other),
        headers={**bearer(token), "Content-Type": CONTENT_TYPE},
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert "/dicomweb/studies/2.25." in value(body, RETRIEVE_URL)
    (failed,) = items(body, FAILED_SOP_SEQUENCE)
    assert (value(failed, FAILURE_REASON), value(failed, ERROR_COMMENT)) == (0xC409, "dicom_study_mismatch")
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert (
            session.scalar(
                select(AuditRecord.object_id).where(AuditRecord.action == AuditAction.INSTANCE_REJECT.value)
            )
            == "dicom_study_mismatch"
        )


def test_an_exhausted_quota_with_nothing_stored_is_a_413_problem(
    client: TestClient, runtime: Runtime, clinician: tuple[str, str]
) -> None:
    institution, token = clinician
    with runtime.db.transaction() as session:
        session.add(
            IngestPolicy(
                institution_id=institution,
                retain_modified_dates=False,
                retain_device_identity=False,
                retain_patient_characteristics=False,
                clean_descriptors=False,
                private_allow_list=[],
                pixel_rules=[],
                institution_quota_bytes=1000,
                device_quota_bytes=None,
                updated_at=runtime.clock.now(),
            )
        )
    response = client.post(
        "/dicomweb/studies",
        content=multipart(_instance(1)),
        headers={**bearer(token), "Content-Type": CONTENT_TYPE},
    )
    assert response.status_code == 413
    assert problem(response)["code"] == "quota_exceeded"
    assert problem(response)["quota"] == "institution"


def test_a_chunked_body_is_read_as_it_arrives(client: TestClient, clinician: tuple[str, str]) -> None:
    _, token = clinician
    data = multipart(_instance(1), _instance(2))

    def chunks() -> object:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    response = client.post(
        "/dicomweb/studies",
        content=chunks(),  # type: ignore[arg-type]
        headers={**bearer(token), "Content-Type": CONTENT_TYPE},
    )
    assert response.status_code == 200, response.text
    assert len(items(response.json(), REFERENCED_SOP_SEQUENCE)) == 2


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        (None, multipart(b"x"), 415, "unsupported_media_type"),
        ("application/dicom", b"DICM", 415, "unsupported_media_type"),
        ('multipart/related; type="application/dicom+xml"; boundary=b', b"", 415, "unsupported_media_type"),
        ('multipart/related; type="application/dicom"', multipart(b"x"), 400, "multipart_boundary_missing"),
        (CONTENT_TYPE, b"", 400, "multipart_empty"),
        (CONTENT_TYPE, b"--wrong-boundary\r\n\r\nabc\r\n--wrong-boundary--", 400, "multipart_malformed"),
        (CONTENT_TYPE, multipart(b"abc")[:-12], 400, "multipart_truncated"),
        (CONTENT_TYPE, multipart(b"{}", part_type="application/dicom+json"), 415, "unsupported_media_type"),
        (CONTENT_TYPE, multipart(), 400, "multipart_empty"),
    ],
)
def test_unreadable_requests_are_problems_with_a_stable_code(
    client: TestClient,
    clinician: tuple[str, str],
    content_type: str | None,
    body: bytes,
    status: int,
    code: str,
) -> None:
    _, token = clinician
    headers = bearer(token)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = client.post("/dicomweb/studies", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert problem(response)["code"] == code


def test_only_dicom_json_responses_are_offered(client: TestClient, clinician: tuple[str, str]) -> None:
    _, token = clinician
    response = client.post(
        "/dicomweb/studies",
        content=multipart(_instance(1)),
        headers={**bearer(token), "Content-Type": CONTENT_TYPE, "Accept": "application/dicom+xml"},
    )
    assert response.status_code == 406
    assert problem(response)["code"] == "not_acceptable"


def test_storing_needs_the_exam_create_permission(client: TestClient, factory: AccountsFactory) -> None:
    institution = factory.institution().id
    auditor, _ = factory.session_for(factory.member(Role.AUDITOR, institution))
    body = multipart(_instance(1))
    anonymous = client.post("/dicomweb/studies", content=body, headers={"Content-Type": CONTENT_TYPE})
    assert (anonymous.status_code, problem(anonymous)["code"]) == (401, "unauthorized")
    refused = client.post(
        "/dicomweb/studies", content=body, headers={**bearer(auditor), "Content-Type": CONTENT_TYPE}
    )
    assert (refused.status_code, problem(refused)["code"]) == (403, "forbidden")


def _service(runtime: Runtime, *, max_instance: int, max_request: int = 10_000_000) -> StowService:
    return StowService(
        runtime.ingest, runtime.db, runtime.clock, StowLimits(max_instance, max_request), base_url="https://x"
    )


def _origin(factory: AccountsFactory) -> IngestOrigin:
    institution = factory.institution().id
    return IngestOrigin(institution, SystemSubject(Actor.system("tests"), institution), IngestChannel.STOW)


async def _chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_a_part_over_the_instance_limit_is_refused_alone_and_audited(
    runtime: Runtime, factory: AccountsFactory
) -> None:
    small, big = _instance(1), _instance(2, rows=256, columns=256)
    assert len(small) < 60_000 < len(big)
    service = _service(runtime, max_instance=60_000)
    result = anyio.run(
        functools.partial(
            service.store,
            _chunks(multipart(small, big)),
            content_type=CONTENT_TYPE,
            content_length=None,
            origin=_origin(factory),
        )
    )
    assert result.status == 202
    (failed,) = items(result.body, FAILED_SOP_SEQUENCE)
    assert (value(failed, FAILURE_REASON), value(failed, ERROR_COMMENT)) == (0xA700, "dicom_too_large")
    assert value(failed, SOP_INSTANCE) == _uid(2)["sop_uid"]  # named from the part's first bytes
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert (
            session.scalar(
                select(AuditRecord.object_id).where(AuditRecord.action == AuditAction.INSTANCE_REJECT.value)
            )
            == "dicom_too_large"
        )


@pytest.mark.parametrize("declared", ["content-length", "chunked"])
def test_a_request_over_the_request_limit_is_a_413(
    runtime: Runtime, factory: AccountsFactory, declared: str
) -> None:
    body = multipart(_instance(1), _instance(2))
    service = _service(runtime, max_instance=1_000_000, max_request=len(body) - 1)
    with pytest.raises(MultipartError) as caught:
        anyio.run(
            functools.partial(
                service.store,
                _chunks(body),
                content_type=CONTENT_TYPE,
                content_length=len(body) if declared == "content-length" else None,  # else counted
                origin=_origin(factory),
            )
        )
    assert (caught.value.status, caught.value.code) == (413, "request_too_large")


def _deflate_bomb(n: int, inflated: int) -> bytes:
    """Instance ``n``'s File Meta group, then a deflated data set of ``inflated`` bytes (one
    OB element of zeros: about a thousandfold smaller sent).
    """
    import struct  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    dataset, _ = make_instance(**_uid(n))  # type: ignore[arg-type]
    dataset.file_meta.TransferSyntaxUID = dicom_uid.DeflatedExplicitVRLittleEndian
    head = to_bytes(dataset)
    meta_end = 144 + struct.unpack("<I", head[140:144])[0]  # (0002,0000): the group's length
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(struct.pack("<HH2sHI", 0x0009, 0x0010, b"OB", 0, inflated - 12))
    zeros = bytes(1 << 20)
    body += b"".join(deflate.compress(zeros) for _ in range((inflated - 12) >> 20))
    body += deflate.compress(bytes((inflated - 12) % len(zeros))) + deflate.flush()
    return head[:meta_end] + body


def test_a_deflate_bomb_is_named_by_its_file_meta_and_refused_within_the_instance_limit(
    settings: Settings, clock: ManualClock
) -> None:
    """A part of ~64 KiB that inflates to 64 MiB, past a 16 MB instance limit: never
    inflated whole (not even to name it: its File Meta group has the UIDs), refused as too
    large; a deflated instance within the limit is stored beside it.
    """
    limit = 16_000_000
    runtime = build_runtime(settings.model_copy(update={"dicom_max_instance_bytes": limit}), clock=clock)
    try:
        initialise(runtime)
        dataset, _ = make_instance(**_uid(1), rows=480, columns=640)  # type: ignore[arg-type]
        dataset.file_meta.TransferSyntaxUID = dicom_uid.DeflatedExplicitVRLittleEndian
        bomb = _deflate_bomb(2, 64 * 1024 * 1024)
        assert len(bomb) < limit // 100
        result = anyio.run(
            functools.partial(
                _service(runtime, max_instance=limit).store,
                _chunks(multipart(to_bytes(dataset), bomb), size=65536),
                content_type=CONTENT_TYPE,
                content_length=None,
                origin=_origin(AccountsFactory(runtime)),
            )
        )
    finally:
        runtime.close()
    assert result.status == 202
    (stored,) = items(result.body, REFERENCED_SOP_SEQUENCE)
    assert value(stored, SOP_INSTANCE) == _uid(1)["sop_uid"]
    (failed,) = items(result.body, FAILED_SOP_SEQUENCE)
    assert value(failed, SOP_INSTANCE) == _uid(2)["sop_uid"]
    assert (value(failed, FAILURE_REASON), value(failed, ERROR_COMMENT)) == (0xA700, "dicom_too_large")
