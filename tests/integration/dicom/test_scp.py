"""The C-STORE SCP in-process, with pynetdicom as the modality, on SQLite and PostgreSQL:
who may associate, the status of every outcome, and no instance value in any log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import select

from factories.accounts import AccountsFactory
from factories.dicom_factory import make_instance
from phivault.audit.actions import AuditAction
from phivault.audit.models import AuditRecord
from phivault.audit.service import Actor, SystemSubject
from phivault.dicom.nodes import DicomNodes, NodeInfo
from phivault.dicom.scp import ScpConfig, StoreScp, build_scp
from phivault.exams.models import Instance, QuarantinedInstance
from phivault.runtime import Runtime
from servers import logscan

CLI = SystemSubject(Actor.system("tests"))
MODALITY = "US_ROOM_3"
STUDY = "1.2.826.0.1.3680043.10.1444.11"


@pytest.fixture
def node(runtime: Runtime) -> NodeInfo:
    institution = AccountsFactory(runtime).institution().id
    return DicomNodes(runtime.db, runtime.clock).add(CLI, institution_id=institution, ae_title=MODALITY)


@pytest.fixture
def scp(runtime: Runtime, node: NodeInfo) -> Iterator[StoreScp]:
    del node
    running = StoreScp(
        ScpConfig(ae_title="PHIVAULT", host="127.0.0.1", port=0, max_associations=4),
        ingest=runtime.ingest,
        nodes=DicomNodes(runtime.db, runtime.clock),
        db=runtime.db,
        clock=runtime.clock,
    )
    running.start()
    yield running
    running.stop(grace=1)


def _associate(scp: StoreScp, calling: str = MODALITY, called: str = "PHIVAULT") -> Association:
    modality = AE(ae_title=calling)
    for sop_class in (
        dicom_uid.UltrasoundImageStorage,
        dicom_uid.UltrasoundMultiFrameImageStorage,
        dicom_uid.SecondaryCaptureImageStorage,
    ):
        modality.add_requested_context(sop_class, dicom_uid.ExplicitVRLittleEndian)
    return modality.associate("127.0.0.1", scp.port, ae_title=called)


def _store(assoc: Association, dataset: Dataset) -> Dataset:
    status: Dataset = assoc.send_c_store(dataset)
    return status


def _instance(n: int, **kwargs: Any) -> tuple[Dataset, list[str]]:  # noqa: ANN401  # make_instance's knobs
    dataset, planted = make_instance(
        study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=f"{STUDY}.1.{n}", **kwargs
    )
    logscan.plant(*planted.values)
    return dataset, planted.values


def test_a_registered_modality_stores_single_and_multi_frame_ultrasound(
    runtime: Runtime, scp: StoreScp, node: NodeInfo
) -> None:
    assoc = _associate(scp)
    assert assoc.is_established
    try:
        single, _ = _instance(1)
        cine, _ = _instance(2, sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, frames=8)
        assert _store(assoc, single).Status == 0x0000
        assert _store(assoc, cine).Status == 0x0000
        assert _store(assoc, single).Status == 0x0000  # a re-send is idempotent
    finally:
        assoc.release()
    with runtime.db.transaction() as session:
        rows = session.scalars(select(Instance)).all()
        assert len(rows) == 2
        assert {(row.institution_id, row.channel) for row in rows} == {(node.institution_id, "dimse")}
        assert {row.number_of_frames for row in rows} == {None, 8}
        actors = session.scalars(
            select(AuditRecord.actor_type).where(AuditRecord.action == AuditAction.INSTANCE_INGEST.value)
        ).all()
    assert set(actors) == {"dicom_node"}


def test_refusals_and_quarantine_answer_their_status_and_code(runtime: Runtime, scp: StoreScp) -> None:
    missing_uid, _ = _instance(3)
    del missing_uid.SeriesInstanceUID
    burned, _ = _instance(4, sop_class=dicom_uid.SecondaryCaptureImageStorage, modality="OT", burned_in="YES")
    assoc = _associate(scp)
    try:
        refused = _store(assoc, missing_uid)
        quarantined = _store(assoc, burned)
    finally:
        assoc.release()
    assert (refused.Status, refused.ErrorComment) == (0xA900, "dicom_missing_uid")
    assert (quarantined.Status, quarantined.ErrorComment) == (0xB000, "quarantined")
    with runtime.db.transaction() as session:
        assert session.scalars(select(Instance)).all() == []
        assert len(session.scalars(select(QuarantinedInstance)).all()) == 1


def test_an_unknown_calling_ae_title_is_rejected_at_association_and_audited(
    runtime: Runtime, scp: StoreScp
) -> None:
    assoc = _associate(scp, calling="INTRUDER")
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    assert rejection is not None
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x03)
    with runtime.db.transaction() as session:
        audited = session.execute(
            select(AuditRecord.object_id, AuditRecord.outcome, AuditRecord.ip).where(
                AuditRecord.action == AuditAction.DICOM_ASSOCIATION_REJECT.value
            )
        ).all()
    assert [(row.object_id, row.outcome, row.ip) for row in audited] == [("INTRUDER", "denied", "127.0.0.1")]


def test_a_removed_node_can_no_longer_associate(runtime: Runtime, scp: StoreScp, node: NodeInfo) -> None:
    DicomNodes(runtime.db, runtime.clock).remove(CLI, node.id)
    assert _associate(scp).is_rejected


def test_another_called_ae_title_is_rejected(scp: StoreScp) -> None:
    assoc = _associate(scp, called="NOT_PHIVAULT")
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    assert rejection is not None
    assert rejection.diagnostic == 0x07  # called AE title not recognized


def test_no_instance_value_reaches_any_log_even_at_debug_level(
    scp: StoreScp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pynetdicom_logger = logging.getLogger("pynetdicom")
    pynetdicom_logger.setLevel(logging.DEBUG)  # as a careless operator might
    dataset, planted = _instance(5)
    broken, more = _instance(6)
    del broken.StudyInstanceUID
    try:
        assoc = _associate(scp)
        try:
            _store(assoc, dataset)
            _store(assoc, broken)
        finally:
            assoc.release()
        _associate(scp, calling="INTRUDER")
    finally:
        pynetdicom_logger.setLevel(logging.WARNING)
    text = "\n".join(f"{record.name} {record.getMessage()}" for record in caplog.records)
    assert [value for value in planted + more if value in text] == []
    assert STUDY not in text  # not even the UIDs the sender used


def test_build_scp_follows_the_settings(runtime: Runtime) -> None:
    scp = build_scp(runtime.settings, ingest=runtime.ingest, db=runtime.db, clock=runtime.clock)
    assert (scp._config.ae_title, scp._config.host, scp._config.port) == ("PHIVAULT", "127.0.0.1", 11112)
    assert scp._config.ssl_context is None
