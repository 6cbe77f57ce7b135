"""Resumable uploads in-process on SQLite and PostgreSQL: chunks encrypted at rest, resumed
from the server's offset, checked chunk by chunk and as a whole, handed to the real ingest
pipeline; quotas before any data; expiry and crypto-shredding of what is left.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from factories.accounts import CLI, AccountsFactory, problem
from factories.devices import TUS, DeviceSession, audit_events, chunk_checksum
from factories.dicom_factory import PATIENT_NAME, make_instance, to_bytes
from phivault.accounts.permissions import Role
from phivault.accounts.principal import Principal
from phivault.clock import ManualClock
from phivault.crypto.models import PatientKey, PurgeLedgerEntry
from phivault.crypto.service import ObjectContext
from phivault.devices.models import Upload, UploadChunk
from phivault.exams.models import Instance
from phivault.runtime import Runtime
from phivault.storage.file import FileObjectStore

CHUNK = 16 * 1024


def dicom(sop_suffix: str = "1", frames: int = 8) -> bytes:
    dataset, _ = make_instance(sop_uid=f"1.2.826.0.1.3680043.10.1444.1.1.1.{sop_suffix}", frames=frames)
    return to_bytes(dataset)


def upload_row(runtime: Runtime, upload_id: str) -> Upload:
    with runtime.db.transaction() as session:
        row = session.get(Upload, upload_id)
        assert row is not None
        return row


def stored_objects(runtime: Runtime, upload_id: str) -> list[str]:
    return sorted(runtime.store.keys(f"upload/{upload_id}/"))


def key_destroyed(runtime: Runtime, patient_key_id: str) -> bool:
    with runtime.db.transaction() as session:
        key = session.get(PatientKey, patient_key_id)
        ledger = session.scalar(
            select(PurgeLedgerEntry.reason).where(PurgeLedgerEntry.patient_key_id == patient_key_id)
        )
    return key is not None and key.wrapped_key is None and ledger == "transient"


def test_an_upload_in_chunks_is_ingested_and_its_receipt_matches(
    runtime: Runtime, device: DeviceSession
) -> None:
    data = dicom()
    assert len(data) > 3 * CHUNK
    created = device.create_upload(len(data))
    assert created.status_code == 201
    upload_id = created.json()["id"]
    assert created.headers["location"] == f"/api/v1/uploads/{upload_id}"
    assert created.headers["tus-resumable"] == "1.0.0"
    assert created.headers["upload-offset"] == "0"
    assert created.headers["upload-expires"].endswith("GMT")
    for start in range(0, len(data), CHUNK):
        sent = device.patch(upload_id, start, data[start : start + CHUNK])
        assert sent.status_code == 204, sent.text
        assert int(sent.headers["upload-offset"]) == min(start + CHUNK, len(data))
    head = device.send("HEAD", f"/api/v1/uploads/{upload_id}", headers=TUS)
    assert (head.status_code, head.headers["upload-offset"], head.headers["upload-length"]) == (
        200,
        str(len(data)),
        str(len(data)),
    )
    assert head.headers["cache-control"] == "no-store"
    finalized = device.finalize(upload_id, hashlib.sha256(data).hexdigest())
    assert finalized.status_code == 200, finalized.text
    receipt = finalized.json()
    assert receipt["status"] == "stored"
    assert receipt["sha256"] == hashlib.sha256(data).hexdigest()
    assert receipt["size"] == len(data)
    assert receipt["sop_instance_uid"] != "1.2.826.0.1.3680043.10.1444.1.1.1.1"  # de-identified UID
    with runtime.db.transaction() as session:
        instance = session.get(Instance, receipt["instance_id"])
        assert instance is not None
        assert (instance.device_id, instance.channel, instance.received_sha256) == (
            device.device_id,
            "upload",
            receipt["sha256"],
        )
    row = upload_row(runtime, upload_id)
    assert row.status == "finished"
    assert key_destroyed(runtime, row.patient_key_id)
    assert stored_objects(runtime, upload_id) == []
    assert [e[2:] for e in audit_events(runtime, "upload.create")] == [("upload", upload_id, "success")]
    assert [e[2:] for e in audit_events(runtime, "upload.finalize")] == [("upload", upload_id, "success")]
    assert audit_events(runtime, "instance.ingest")[-1][:2] == ("device", device.device_id)
    state = device.send("GET", f"/api/v1/uploads/{upload_id}").json()
    assert (state["status"], state["receipt"]) == ("finished", receipt)


def test_finalizing_again_answers_the_same_receipt_and_stores_once(
    runtime: Runtime, device: DeviceSession
) -> None:
    data = dicom()
    first = device.upload(data, CHUNK)
    assert first.status_code == 200
    upload_id = first.request.url.path.split("/")[-2]
    again = device.finalize(upload_id, hashlib.sha256(data).hexdigest())
    assert again.status_code == 200
    assert again.json() == first.json()
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1


def test_chunks_are_encrypted_at_rest(runtime: Runtime, device: DeviceSession) -> None:
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    device.patch(upload_id, 0, data[: 4 * CHUNK])
    keys = stored_objects(runtime, upload_id)
    assert len(keys) == 1
    assert isinstance(runtime.store, FileObjectStore)
    stored = (runtime.store.root / keys[0]).read_bytes()
    assert PATIENT_NAME.encode() in data[: 4 * CHUNK]
    assert PATIENT_NAME.encode() not in stored
    assert data[1000:1100] not in stored
    assert len(stored) > 4 * CHUNK  # header and tags


def test_a_chunk_at_another_offset_is_refused_with_the_servers_offset(device: DeviceSession) -> None:
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    assert device.patch(upload_id, 0, data[:CHUNK]).status_code == 204
    for wrong in (0, 2 * CHUNK):
        answer = device.patch(upload_id, wrong, data[wrong : wrong + CHUNK])
        assert answer.status_code == 409
        assert problem(answer)["code"] == "upload_offset_mismatch"
        assert answer.headers["upload-offset"] == str(CHUNK)
        assert problem(answer)["offset"] == CHUNK


def test_a_tampered_chunk_is_refused_and_nothing_of_it_is_kept(
    runtime: Runtime, device: DeviceSession
) -> None:
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    tampered = bytearray(data[:CHUNK])
    tampered[100] ^= 0x01
    answer = device.patch(upload_id, 0, bytes(tampered), checksum=chunk_checksum(data[:CHUNK]))
    assert answer.status_code == 460
    assert problem(answer)["code"] == "chunk_checksum_mismatch"
    assert problem(answer)["title"] == "Checksum Mismatch"
    assert upload_row(runtime, upload_id).offset == 0
    assert stored_objects(runtime, upload_id) == []
    assert device.patch(upload_id, 0, data[:CHUNK]).status_code == 204


def test_chunks_need_a_checksum_the_tus_version_and_the_tus_media_type(device: DeviceSession) -> None:
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    base = {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    cases = {
        "checksum_required": {**TUS, **base},
        "tus_version_unsupported": {**base, "Upload-Checksum": chunk_checksum(data[:10])},
        "unsupported_media_type": {
            **TUS,
            **base,
            "Content-Type": "application/octet-stream",
            "Upload-Checksum": chunk_checksum(data[:10]),
        },
        "validation_error": {**TUS, **base, "Upload-Checksum": "md5 AAAA"},
    }
    for code, headers in cases.items():
        answer = device.send("PATCH", f"/api/v1/uploads/{upload_id}", headers=headers, content=data[:10])
        assert problem(answer)["code"] == code, answer.text
    assert (
        device.send(
            "PATCH", f"/api/v1/uploads/{upload_id}", headers=cases["tus_version_unsupported"], content=b"x"
        ).headers["tus-version"]
        == "1.0.0"
    )


def test_a_chunk_past_the_declared_length_is_refused(runtime: Runtime, device: DeviceSession) -> None:
    upload_id = device.create_upload(100).json()["id"]
    answer = device.patch(upload_id, 0, b"x" * 101)
    assert answer.status_code == 400
    assert problem(answer)["code"] == "chunk_length_invalid"
    assert stored_objects(runtime, upload_id) == []


def test_a_wrong_final_digest_is_refused_and_nothing_is_stored(
    runtime: Runtime, device: DeviceSession
) -> None:
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    device.patch(upload_id, 0, data)
    wrong = hashlib.sha256(data + b"x").hexdigest()
    answer = device.finalize(upload_id, wrong)
    assert answer.status_code == 422
    assert problem(answer)["code"] == "upload_digest_mismatch"
    assert (
        device.finalize(upload_id, hashlib.sha256(data).hexdigest()).json()["code"]
        == "upload_digest_mismatch"
    )
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
    row = upload_row(runtime, upload_id)
    assert row.status == "failed"
    assert key_destroyed(runtime, row.patient_key_id)
    assert stored_objects(runtime, upload_id) == []
    assert audit_events(runtime, "upload.finalize")[-1][-1] == "failure"


def test_finalizing_an_incomplete_upload_is_refused(device: DeviceSession) -> None:
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    device.patch(upload_id, 0, data[:CHUNK])
    answer = device.finalize(upload_id, hashlib.sha256(data).hexdigest())
    assert answer.status_code == 409
    assert problem(answer)["code"] == "upload_incomplete"
    assert device.patch(upload_id, CHUNK, data[CHUNK:]).status_code == 204
    assert device.finalize(upload_id, hashlib.sha256(data).hexdigest()).status_code == 200


def test_content_that_is_not_dicom_is_refused_with_the_pipelines_code(
    runtime: Runtime, device: DeviceSession
) -> None:
    data = b"not a DICOM file at all" * 100
    answer = device.upload(data, CHUNK)
    assert answer.status_code == 422
    assert problem(answer)["code"] == "dicom_not_dicom"
    upload_id = answer.request.url.path.split("/")[-2]
    assert problem(device.finalize(upload_id, hashlib.sha256(data).hexdigest()))["code"] == "dicom_not_dicom"
    assert upload_row(runtime, upload_id).status == "rejected"
    assert stored_objects(runtime, upload_id) == []


def test_a_chunk_altered_in_storage_fails_its_integrity_check(
    runtime: Runtime, device: DeviceSession
) -> None:
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    device.patch(upload_id, 0, data)
    assert isinstance(runtime.store, FileObjectStore)
    path = runtime.store.root / stored_objects(runtime, upload_id)[0]
    stored = bytearray(path.read_bytes())
    stored[len(stored) // 2] ^= 0x01
    path.write_bytes(bytes(stored))
    answer = device.finalize(upload_id, hashlib.sha256(data).hexdigest())
    assert answer.status_code == 409
    assert problem(answer)["code"] == "integrity_check_failed"
    again = device.finalize(upload_id, hashlib.sha256(data).hexdigest())
    assert (again.status_code, problem(again)["code"]) == (409, "integrity_check_failed")
    runtime.keys.wait_for_alarms()
    assert audit_events(runtime, "object.integrity_failure")
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_uploads_larger_than_an_exam_may_be_are_refused_before_any_data(
    runtime: Runtime, device: DeviceSession
) -> None:
    answer = device.create_upload(runtime.settings.dicom_max_instance_bytes + 1)
    assert answer.status_code == 413
    assert problem(answer)["code"] == "upload_too_large"
    for bad in ("0", "-1", "1e9", "twelve", ""):
        headers = {**TUS, "Upload-Length": bad}
        assert device.send("POST", "/api/v1/uploads", headers=headers).status_code == 422


def test_the_device_quota_is_enforced_at_creation_counting_unfinished_uploads(
    runtime: Runtime, factory: AccountsFactory, institution: str, device: DeviceSession
) -> None:
    admin = factory.member(Role.INSTITUTION_ADMIN, institution, mfa=True)
    runtime.ingest.policies.set_device_quota(
        Principal.for_user(admin.user_id, institution, Role.INSTITUTION_ADMIN, None),
        str(device.device_id),
        1000,
    )
    over = device.create_upload(1001)
    assert over.status_code == 413
    body = problem(over)
    assert (body["code"], body["quota_scope"], body["quota_bytes"], body["incoming_bytes"]) == (
        "quota_exceeded",
        "device",
        1000,
        1001,
    )
    assert "1000" in body["detail"]
    assert device.create_upload(600).status_code == 201
    second = device.create_upload(600)  # 600 + 600 unfinished > 1000
    assert problem(second)["code"] == "quota_exceeded"
    assert problem(second)["incoming_bytes"] == 1200
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Upload)) == 1


def test_an_abandoned_upload_expires_and_its_chunks_are_shredded(
    runtime: Runtime, clock: ManualClock, device: DeviceSession
) -> None:
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    device.patch(upload_id, 0, data[:CHUNK])
    clock.advance(timedelta(hours=23))
    assert device.refresh_token().status_code == 200
    # activity extends the expiry
    assert device.patch(upload_id, CHUNK, data[CHUNK : 2 * CHUNK]).status_code == 204
    clock.advance(timedelta(hours=23))
    report = runtime.uploads.run_housekeeping()
    assert report.expired == 0
    assert upload_row(runtime, upload_id).status == "open"
    clock.advance(timedelta(hours=1, seconds=1))
    report = runtime.uploads.run_housekeeping()
    assert (report.expired, report.cleaned) == (1, 1)
    row = upload_row(runtime, upload_id)
    assert row.status == "expired"
    assert key_destroyed(runtime, row.patient_key_id)
    assert stored_objects(runtime, upload_id) == []
    assert device.refresh_token().status_code == 200
    gone = device.patch(upload_id, 2 * CHUNK, data[2 * CHUNK : 3 * CHUNK])
    assert gone.status_code == 410
    assert problem(gone)["code"] == "upload_expired"
    assert audit_events(runtime, "upload.expire") == [("system", "uploads", "upload", upload_id, "success")]
    clock.advance(timedelta(days=31))
    runtime.uploads.run_housekeeping()
    with runtime.db.transaction() as session:
        assert session.get(Upload, upload_id) is None


def test_an_object_a_crash_left_behind_never_becomes_part_of_the_upload(
    runtime: Runtime, device: DeviceSession
) -> None:
    """A crash after a chunk's object was written but before its row: the offset did not
    move, the device resends, and the stray object goes with the upload.
    """
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    with runtime.db.transaction() as session:
        row = session.get(Upload, upload_id)
        assert row is not None
        stray = runtime.keys.prepare_object(
            session, ObjectContext(row.institution_id, row.patient_key_id, f"upload/{upload_id}")
        )
    stray.write(runtime.store, io.BytesIO(data[:CHUNK]))
    assert upload_row(runtime, upload_id).offset == 0
    for start in range(0, len(data), CHUNK):
        assert device.patch(upload_id, start, data[start : start + CHUNK]).status_code == 204
    with runtime.db.transaction() as session:
        chunks = session.scalar(
            select(func.count()).select_from(UploadChunk).where(UploadChunk.upload_id == upload_id)
        )
    assert len(stored_objects(runtime, upload_id)) == int(chunks or 0) + 1
    assert device.finalize(upload_id, hashlib.sha256(data).hexdigest()).status_code == 200
    assert stored_objects(runtime, upload_id) == []


def test_a_repeated_creation_with_the_same_client_ref_finds_the_same_upload(device: DeviceSession) -> None:
    first = device.create_upload(100, client_ref="item-1")
    again = device.create_upload(100, client_ref="item-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert device.create_upload(100, client_ref="item-2").json()["id"] != first.json()["id"]


def test_another_devices_or_institutions_upload_answers_404(
    runtime: Runtime,
    factory: AccountsFactory,
    device: DeviceSession,
    new_device: Callable[..., DeviceSession],
) -> None:
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    neighbour = new_device(device.institution_id)
    stranger = new_device(factory.institution("Away Clinic").id)
    for other in (neighbour, stranger):
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"/api/v1/uploads/{upload_id}", {}),
            ("HEAD", f"/api/v1/uploads/{upload_id}", {"headers": TUS}),
            ("DELETE", f"/api/v1/uploads/{upload_id}", {"headers": TUS}),
            ("POST", f"/api/v1/uploads/{upload_id}/finalize", {"json_body": {"sha256": "0" * 64}}),
        ]
        for method, path, kwargs in requests:
            answer = other.send(method, path, **kwargs)
            assert answer.status_code == 404, (method, answer.text)
        patched = other.patch(upload_id, 0, data[:CHUNK])
        assert problem(patched)["code"] == "not_found"
    assert upload_row(runtime, upload_id).offset == 0


def test_a_cancelled_upload_is_shredded(runtime: Runtime, device: DeviceSession) -> None:
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    device.patch(upload_id, 0, data[:CHUNK])
    assert device.send("DELETE", f"/api/v1/uploads/{upload_id}", headers=TUS).status_code == 204
    row = upload_row(runtime, upload_id)
    assert row.status == "cancelled"
    assert key_destroyed(runtime, row.patient_key_id)
    assert stored_objects(runtime, upload_id) == []
    assert device.patch(upload_id, CHUNK, data[CHUNK : 2 * CHUNK]).status_code == 410


def test_revoking_a_device_cancels_its_unfinished_uploads(runtime: Runtime, device: DeviceSession) -> None:
    data = dicom()
    upload_id = device.create_upload(len(data)).json()["id"]
    device.patch(upload_id, 0, data[:CHUNK])
    runtime.devices.revoke(CLI, str(device.device_id))
    assert upload_row(runtime, upload_id).status == "cancelled"
    runtime.uploads.run_housekeeping()
    row = upload_row(runtime, upload_id)
    assert key_destroyed(runtime, row.patient_key_id)
    assert stored_objects(runtime, upload_id) == []


@pytest.mark.parametrize("size", [1, CHUNK, CHUNK + 1])
def test_uploads_of_any_size_round_trip_through_the_stream(
    runtime: Runtime, device: DeviceSession, size: int
) -> None:
    """The decrypting stream ingest reads: every size, read in odd pieces and after seeks."""
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    upload_id = device.create_upload(size).json()["id"]
    for start in range(0, size, 1000):
        assert device.patch(upload_id, start, data[start : start + 1000]).status_code == 204
    with runtime.db.transaction() as session:
        row = session.get(Upload, upload_id)
        assert row is not None
        stream = runtime.uploads._open_stream(session, row)
    pieces = []
    while piece := stream.read(333):
        pieces.append(piece)
    assert b"".join(pieces) == data
    stream.seek(size // 2)
    assert stream.read() == data[size // 2 :]
    stream.seek(0)
    assert stream.read(7) == data[:7]
