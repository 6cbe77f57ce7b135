"""The read core on SQLite and PostgreSQL: scoping by institution, stored vs re-identified
bytes, frames by range reads, the name and PatientID tokens ingest writes.
"""

from __future__ import annotations

import io
from datetime import timedelta

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from factories.dicom_factory import PATIENT_ID, PATIENT_NAME, phi_left_in
from factories.exams import ExamsFactory, IngestedStudy, reader_of, stored_pixels
from phivault.accounts.errors import Forbidden
from phivault.accounts.permissions import Role
from phivault.accounts.principal import Principal
from phivault.crypto.service import OpenedObject
from phivault.dicom.deid import text_value
from phivault.dicom.layout import read_frames
from phivault.dicom.phi import PhiRecord
from phivault.exams.errors import NotFound
from phivault.exams.name_index import patient_id_token, patient_tokens
from phivault.exams.phi_models import PhiPatient, PhiPatientToken
from phivault.exams.phi_store import patient_index
from phivault.exams.reading import ExamReader, InstanceReading
from phivault.runtime import Runtime


@pytest.fixture
def exams(runtime: Runtime) -> ExamsFactory:
    return ExamsFactory(runtime)


@pytest.fixture
def reader(runtime: Runtime) -> ExamReader:
    return reader_of(runtime)


def _open(reader: ExamReader, principal: Principal, study_uid: str, sop_uid: str) -> InstanceReading:
    with reader.db.transaction() as session:
        study = reader.study(session, principal, study_uid)
        instance = reader.instance(session, principal, study, None, sop_uid)
    return reader.read_instance(principal, study, instance)


def test_clinicians_get_the_instance_back_as_it_was_sent(reader: ExamReader, exams: ExamsFactory) -> None:
    institution = exams.accounts.institution().id
    study = exams.study(institution, instances=1, frames=3)
    _, clinician = exams.reader(Role.CLINICIAN, institution)
    receipt = study.receipts[0]
    reading = _open(reader, clinician, receipt.study_instance_uid, receipt.sop_instance_uid)
    assert reading.reidentified
    restored = dcmread(io.BytesIO(b"".join(reading.iter_dicom())))
    original = study.originals[0]
    assert restored.PatientName == PATIENT_NAME
    assert restored.PatientID == PATIENT_ID
    assert restored.SOPInstanceUID == original.SOPInstanceUID
    assert restored.StudyInstanceUID == original.StudyInstanceUID
    assert restored.SeriesInstanceUID == original.SeriesInstanceUID
    assert restored.PixelData == stored_pixels(48, 64, 3, rgb=True).tobytes()
    for element in original:  # the top level (paths inside sequences: tests/unit/dicom)
        text = text_value(element)
        if text is not None and element.tag in restored:
            assert text_value(restored[element.tag]) == text, element.keyword
    # the original UIDs address the same instance for a PHI reader
    again = _open(reader, clinician, original.StudyInstanceUID, original.SOPInstanceUID)
    assert again.instance.id == reading.instance.id


def test_readers_without_phi_read_get_the_stored_instance(reader: ExamReader, exams: ExamsFactory) -> None:
    institution = exams.accounts.institution().id
    study = exams.study(institution, instances=1)
    _, admin = exams.reader(Role.INSTITUTION_ADMIN, institution)
    receipt = study.receipts[0]
    reading = _open(reader, admin, receipt.study_instance_uid, receipt.sop_instance_uid)
    assert not reading.reidentified
    stored = b"".join(reading.iter_dicom())
    assert len(stored) == reading.size
    assert phi_left_in(stored, study.planted) == []
    assert phi_left_in(b"".join(_header_bytes(reading)), study.planted) == []
    with pytest.raises(NotFound):  # an original UID is no key for them
        _open(reader, admin, study.originals[0].StudyInstanceUID, receipt.sop_instance_uid)


def _header_bytes(reading: InstanceReading) -> list[bytes]:
    buffer = io.BytesIO()
    header = reading.header()
    header.save_as(buffer)
    return [buffer.getvalue()]


def test_another_institution_finds_nothing_and_devices_are_refused(
    reader: ExamReader, exams: ExamsFactory
) -> None:
    home, away = exams.accounts.institution().id, exams.accounts.institution().id
    study = exams.study(home, instances=1)
    _, stranger = exams.reader(Role.CLINICIAN, away)
    _, device = exams.reader(Role.DEVICE, home)
    _, operator = exams.reader(Role.OPERATOR, None)
    receipt = study.receipts[0]
    for uid in (receipt.study_instance_uid, study.originals[0].StudyInstanceUID):
        with pytest.raises(NotFound):
            _open(reader, stranger, uid, receipt.sop_instance_uid)
    for refused in (device, operator):
        with pytest.raises(Forbidden):
            _open(reader, refused, receipt.study_instance_uid, receipt.sop_instance_uid)


@pytest.mark.parametrize(("rgb", "frames"), [(True, 5), (False, 7)])
def test_frames_are_cut_out_by_range_reads(
    reader: ExamReader, exams: ExamsFactory, *, rgb: bool, frames: int
) -> None:
    institution = exams.accounts.institution().id
    study = exams.study(institution, instances=1, frames=frames, rgb=rgb, rows=300, columns=400)
    _, clinician = exams.reader(Role.CLINICIAN, institution)
    receipt = study.receipts[0]
    reading = _open(reader, clinician, receipt.study_instance_uid, receipt.sop_instance_uid)
    counting = _CountingReads(reading.opened)
    wanted = [frames, 2]
    got = read_frames(counting, reading.layout, wanted)
    assert got == reading.frames(wanted)
    expected = stored_pixels(300, 400, frames, rgb=rgb)
    for number, data in zip(wanted, got, strict=True):
        assert np.array_equal(np.frombuffer(data, np.uint8), expected[number - 1].ravel())
    # the header in a block or two, then exactly the frames: never the whole object
    frame_bytes = 300 * 400 * (3 if rgb else 1)
    assert sum(counting.lengths) == 2 * frame_bytes
    with pytest.raises(IndexError):
        reading.frames([frames + 1])


class _CountingReads:
    def __init__(self, opened: OpenedObject) -> None:
        self.opened = opened
        self.lengths: list[int] = []

    @property
    def plaintext_size(self) -> int:
        return self.opened.plaintext_size

    def read(self, offset: int, length: int) -> bytes:
        self.lengths.append(length)
        return self.opened.read(offset, length)


def test_ingest_writes_the_patients_name_and_id_tokens(runtime: Runtime, exams: ExamsFactory) -> None:
    institution = exams.accounts.institution().id
    study: IngestedStudy = exams.study(institution, instances=2)
    secret = runtime.ingest.secrets.get(institution)
    with runtime.phi_db.transaction() as phi:
        patient = phi.scalars(select(PhiPatient)).one()
        tokens = set(
            phi.scalars(select(PhiPatientToken.token).where(PhiPatientToken.patient_id == patient.id))
        )
    assert tokens == set(patient_tokens(secret, patient_name=PATIENT_NAME, patient_id=PATIENT_ID))
    assert patient_id_token(secret, PATIENT_ID) in tokens
    del study


def test_the_sweeper_removes_an_emptied_patient_with_its_tokens(
    runtime: Runtime, exams: ExamsFactory
) -> None:
    institution = exams.accounts.institution().id
    secret = runtime.ingest.secrets.get(institution)
    record = PhiRecord(patient_name="Left^Behind", patient_id="ORPHAN-1")
    runtime.ingest.phi.find_or_create_patient(
        institution,
        patient_index(secret, record, "1.2.3"),
        record,
        tokens=patient_tokens(secret, patient_name=record.patient_name, patient_id=record.patient_id),
    )
    runtime.sweeper.sweep(grace=timedelta(0))
    with runtime.phi_db.transaction() as phi:
        assert phi.scalar(select(func.count()).select_from(PhiPatient)) == 0
        assert phi.scalar(select(func.count()).select_from(PhiPatientToken)) == 0
