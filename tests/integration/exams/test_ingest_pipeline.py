"""The ingest pipeline end to end in-process, on SQLite and PostgreSQL: what is stored where,
PHI nowhere outside the PHI store, receipts, idempotency, quarantine, rejections, quotas.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from pydicom import dcmread
from pydicom import uid as dicom_uid
from sqlalchemy import func, select, text

from factories.accounts import AccountsFactory
from factories.dicom_factory import ISSUER, PATIENT_ID, PATIENT_NAME, make_instance, phi_left_in, to_bytes
from phivault.audit.actions import AuditAction
from phivault.audit.models import AuditRecord
from phivault.audit.service import Actor, SystemSubject
from phivault.crypto.service import ObjectContext
from phivault.dicom.errors import DicomRejected, RejectionCode
from phivault.exams.errors import QuotaExceeded
from phivault.exams.ingest import INSTANCE_KIND
from phivault.exams.models import IngestPolicy, Instance, QuarantinedInstance, Series, Study
from phivault.exams.phi_models import PhiInstance, PhiPatient, PhiStudy
from phivault.exams.types import IngestChannel, IngestOrigin, ReceiptStatus
from phivault.runtime import Runtime

DEVICE = "0b5f4c7e-2f7e-4c1a-9d0e-3f1a2b3c4d5e"


@pytest.fixture
def institution(runtime: Runtime) -> str:
    return AccountsFactory(runtime).institution().id


def origin(institution_id: str, device_id: str | None = DEVICE) -> IngestOrigin:
    return IngestOrigin(
        institution_id,
        SystemSubject(Actor.system("test-sender"), institution_id),
        IngestChannel.STOW,
        device_id=device_id,
    )


def _all_object_plaintexts(runtime: Runtime) -> Iterator[tuple[str, bytes]]:
    with runtime.db.transaction() as session:
        rows = session.execute(
            select(Instance.object_key, Instance.institution_id, Study.patient_key_id).join(
                Study, Study.id == Instance.study_id
            )
        ).all()
        for key, institution_id, patient_key_id in rows:
            opened = runtime.keys.open_object(
                runtime.store,
                key,
                session=session,
                context=ObjectContext(institution_id, patient_key_id, INSTANCE_KIND),
            )
            yield key, b"".join(opened.iter_plaintext())


def _database_dump(runtime: Runtime) -> bytes:
    """Every value of every table of the main database, as text."""
    out = io.StringIO()
    with runtime.db.transaction() as session:
        for table in runtime_tables(runtime):
            for row in session.execute(text(f'SELECT * FROM "{table}"')):  # noqa: S608 # table names from the schema
                out.write(repr(tuple(row)))
    return out.getvalue().encode("utf-8", "replace")


def runtime_tables(runtime: Runtime) -> list[str]:
    from sqlalchemy import inspect  # noqa: PLC0415

    return inspect(runtime.db.engine).get_table_names()


def test_no_phi_outside_the_phi_store(runtime: Runtime, institution: str) -> None:
    datasets = [
        make_instance(sop_uid=f"1.2.826.0.1.3680043.10.1444.1.1.1.{n}", burned_in="NO") for n in range(1, 4)
    ]
    planted = sorted({value for _, p in datasets for value in p.values})
    receipts = [runtime.ingest.ingest(to_bytes(ds), origin(institution)) for ds, _ in datasets]
    assert [r.status for r in receipts] == [ReceiptStatus.STORED] * 3
    assert len({r.study_id for r in receipts}) == 1

    # Objects: the ciphertext, and the decrypted de-identified instances.
    for key in runtime.store.keys():  # noqa: SIM118  # an ObjectStore, not a dict
        with runtime.store.open(key) as stream:
            raw = stream.read()
        assert [v for v in planted if v.encode() in raw] == []
    plaintexts = list(_all_object_plaintexts(runtime))
    assert len(plaintexts) == 3
    for _, plaintext in plaintexts:
        assert phi_left_in(plaintext, planted) == []
        stored = dcmread(io.BytesIO(plaintext))
        assert stored.PatientIdentityRemoved == "YES"
        assert stored.StudyInstanceUID == receipts[0].study_instance_uid
    # The index database: every table, every value.
    dump = _database_dump(runtime)
    assert [v for v in planted if v.encode() in dump] == []


def test_phi_store_keeps_the_phi_sealed_and_matched_by_blind_index(
    runtime: Runtime, institution: str
) -> None:
    first, _ = make_instance()
    second, _ = make_instance(
        study_uid="1.2.826.0.1.3680043.10.1444.2",
        series_uid="1.2.826.0.1.3680043.10.1444.2.1",
        sop_uid="1.2.826.0.1.3680043.10.1444.2.1.1",
    )
    a = runtime.ingest.ingest(to_bytes(first), origin(institution))
    b = runtime.ingest.ingest(to_bytes(second), origin(institution))
    assert a.study_id != b.study_id
    with runtime.phi_db.transaction() as phi, runtime.db.transaction() as session:
        patients = phi.scalars(select(PhiPatient)).all()
        assert len(patients) == 1, "the same PatientID + issuer is one patient"
        raw = b"".join(p.patient_name + p.patient_id for p in patients)
        assert PATIENT_NAME.encode() not in raw
        assert PATIENT_ID.encode() not in raw
        values = runtime.ingest.phi.patient_values(session, phi, patients[0].id)
        assert values["patient_name"] == PATIENT_NAME
        assert values["patient_id"] == PATIENT_ID
        assert values["issuer_of_patient_id"] == ISSUER
        assert phi.scalar(select(func.count()).select_from(PhiStudy)) == 2
        record = phi.get(PhiInstance, a.instance_id)
        assert record is not None
        document = json.loads(
            runtime.keys.decrypt_field(
                session,
                patients[0].patient_key_id,
                record.record,
                aad=f"phi_instances/record/{a.instance_id}".encode(),
            )
        )
        assert document["uids"]["sop_instance_uid"] == first.SOPInstanceUID
        study = session.get(Study, a.study_id)
        assert study is not None
        assert study.patient_ref == patients[0].id


def test_resending_is_idempotent(runtime: Runtime, institution: str) -> None:
    ds, _ = make_instance()
    data = to_bytes(ds)
    first = runtime.ingest.ingest(data, origin(institution))
    again = runtime.ingest.ingest(io.BytesIO(data), origin(institution))
    assert again.status is ReceiptStatus.DUPLICATE
    assert (again.instance_id, again.sop_instance_uid, again.sha256) == (
        first.instance_id,
        first.sop_instance_uid,
        first.sha256,
    )
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        study = session.get(Study, first.study_id)
        assert study is not None
        assert study.number_of_instances == 1
        actions = session.scalars(
            select(AuditRecord.action).where(AuditRecord.action.like("instance.%"))
        ).all()
        assert sorted(actions) == [AuditAction.INSTANCE_DUPLICATE.value, AuditAction.INSTANCE_INGEST.value]
    assert len(list(runtime.store.keys())) == 1


def test_uids_are_remapped_consistently_per_institution(runtime: Runtime, institution: str) -> None:
    other = AccountsFactory(runtime).institution().id
    ds, _ = make_instance()
    here = runtime.ingest.ingest(to_bytes(ds), origin(institution))
    there = runtime.ingest.ingest(to_bytes(ds), origin(other))
    assert here.status is there.status is ReceiptStatus.STORED
    assert here.sop_instance_uid != ds.SOPInstanceUID
    assert here.sop_instance_uid != there.sop_instance_uid
    assert here.study_instance_uid != there.study_instance_uid
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Series)) == 2


def test_rejections_store_nothing_and_are_audited(runtime: Runtime, institution: str) -> None:
    ds, _ = make_instance()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: not accepted
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    cases = [
        (b"not dicom at all", RejectionCode.NOT_DICOM),
        (to_bytes(ds), RejectionCode.UNSUPPORTED_SOP_CLASS),
    ]
    truncated = to_bytes(make_instance()[0])
    cases.append((truncated[: len(truncated) // 2], RejectionCode.TRUNCATED))
    for data, code in cases:
        with pytest.raises(DicomRejected) as caught:
            runtime.ingest.ingest(data, origin(institution))
        assert caught.value.code is code
    assert list(runtime.store.keys()) == []
    with runtime.db.transaction() as session:
        rejected = session.scalars(
            select(AuditRecord.object_id).where(AuditRecord.action == AuditAction.INSTANCE_REJECT.value)
        ).all()
    assert sorted(r or "" for r in rejected) == sorted(code.value for _, code in cases)
    with runtime.phi_db.transaction() as phi:
        assert phi.scalar(select(func.count()).select_from(PhiPatient)) == 0


def test_burned_in_text_without_a_rule_is_quarantined(runtime: Runtime, institution: str) -> None:
    ds, planted = make_instance(
        sop_class=dicom_uid.SecondaryCaptureImageStorage, modality="OT", burned_in="YES"
    )
    receipt = runtime.ingest.ingest(to_bytes(ds), origin(institution))
    assert receipt.status is ReceiptStatus.QUARANTINED
    assert receipt.study_id is None
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
        row = session.get(QuarantinedInstance, receipt.instance_id)
        assert row is not None
        assert row.reason == "no_matching_rule"
        assert row.object_key is not None
    with runtime.store.open(row.object_key) as stream:
        assert [v for v in planted.values if v.encode() in stream.read()] == []
    again = runtime.ingest.ingest(to_bytes(ds), origin(institution))
    assert (again.status, again.instance_id) == (ReceiptStatus.QUARANTINED, receipt.instance_id)


def test_quotas_refuse_before_anything_is_stored(runtime: Runtime, institution: str) -> None:
    ds, _ = make_instance()
    data = to_bytes(ds)
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
                institution_quota_bytes=None,
                device_quota_bytes=len(data) + 10,
                updated_at=runtime.clock.now(),
            )
        )
    runtime.ingest.ingest(data, origin(institution))
    second, _ = make_instance(sop_uid="1.2.826.0.1.3680043.10.1444.1.1.1.2")
    with pytest.raises(QuotaExceeded) as caught:
        runtime.ingest.ingest(to_bytes(second), origin(institution))
    assert caught.value.scope == "device"
    # Another device of the institution still has room; no device: only the institution quota.
    runtime.ingest.ingest(to_bytes(second), origin(institution, device_id=None))
    assert len(list(runtime.store.keys())) == 2
