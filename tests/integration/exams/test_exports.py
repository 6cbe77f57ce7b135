"""Export to PACS against real peers: Orthanc (Debian ``orthanc``) and DCMTK's ``storescp``
on 127.0.0.1. After an export the PACS holds the instances re-identified, under their
original UIDs; a PACS that is down makes the export retry and then fail with the reason;
once it is back a retry completes, and nothing is sent twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from factories.accounts import LOOPBACK, bearer
from factories.dicom_factory import PATIENT_NAME
from factories.exams import ExamsFactory, IngestedStudy
from phivault.accounts.permissions import Role
from phivault.audit.models import AuditRecord
from phivault.clock import ManualClock
from phivault.exams.outbound_models import ExamExportItem
from phivault.runtime import Runtime
from phivault.web.app import create_app
from servers.common import free_port, port_open, unavailable, wait_until
from servers.orthanc import OrthancServer, OrthancUnavailable
from servers.pki import TestAuthority, loopback_names

CALLING = "PHIVAULT"


@dataclass
class World:
    runtime: Runtime
    client: TestClient
    study: IngestedStudy
    admin: dict[str, str]
    clinician: dict[str, str]
    stranger_admin: dict[str, str]


@pytest.fixture
def world(runtime: Runtime) -> World:
    exams = ExamsFactory(runtime)
    home, away = exams.accounts.institution().id, exams.accounts.institution().id
    study = exams.study(home, instances=2)
    accounts = exams.accounts

    def headers(role: Role, institution: str) -> dict[str, str]:
        return bearer(accounts.session_for(accounts.member(role, institution, mfa=True), mfa=True)[0])

    client = TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK)
    return World(
        runtime,
        client,
        study,
        headers(Role.INSTITUTION_ADMIN, home),
        headers(Role.CLINICIAN, home),
        headers(Role.INSTITUTION_ADMIN, away),
    )


def _orthanc() -> OrthancServer:
    try:
        return OrthancServer(peers={CALLING: ("127.0.0.1", 104)})
    except OrthancUnavailable as exc:
        unavailable(str(exc))
        raise


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    server = _orthanc()
    try:
        server.start()
    except OrthancUnavailable as exc:
        unavailable(str(exc))
    yield server
    server.remove()


def _destination(world: World, port: int, **extra: Any) -> str:  # noqa: ANN401
    body = {"name": f"PACS {port}", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port, **extra}
    response = world.client.post("/api/v1/pacs-destinations", json=body, headers=world.admin)
    assert response.status_code == 201, response.text
    destination_id: str = response.json()["id"]
    return destination_id


def _export(world: World, destination_id: str) -> dict[str, Any]:
    response = world.client.post(
        f"/api/v1/exams/{world.study.study_id}/exports",
        json={"destination_id": destination_id},
        headers=world.clinician,
    )
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


def _follow(world: World, export_id: str) -> dict[str, Any]:
    response = world.client.get(
        f"/api/v1/exams/{world.study.study_id}/exports/{export_id}", headers=world.clinician
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _run_jobs(runtime: Runtime, *, later: timedelta = timedelta(0)) -> None:
    clock = runtime.clock
    assert isinstance(clock, ManualClock)
    clock.advance(later)
    worker = runtime.new_worker()
    for _ in range(20):
        if not worker.run_once():
            return


def _orthanc_instances(server: OrthancServer) -> list[dict[str, str]]:
    with server.rest() as rest:
        ids = rest.get("/instances").raise_for_status().json()
        return [rest.get(f"/instances/{i}/simplified-tags").raise_for_status().json() for i in ids]


def test_an_export_reaches_orthanc_re_identified_under_the_original_uids(
    world: World, orthanc: OrthancServer
) -> None:
    export = _export(world, _destination(world, orthanc.dicom_port))
    assert export["status"] == "queued"
    assert export["total"] == 2
    # Asking again while it is under way gives the same export.
    assert _export(world, export["destination_id"])["id"] == export["id"]
    _run_jobs(world.runtime)
    followed = _follow(world, export["id"])
    assert followed["status"] == "completed", followed
    assert [item["status"] for item in followed["items"]] == ["sent", "sent"]
    assert {item["dimse_status"] for item in followed["items"]} == {0}
    stored = {tags["SOPInstanceUID"]: tags for tags in _orthanc_instances(orthanc)}
    for original in world.study.originals:
        tags = stored[str(original.SOPInstanceUID)]
        assert tags["PatientName"] == PATIENT_NAME
        assert tags["PatientID"] == str(original.PatientID)
        assert tags["StudyInstanceUID"] == str(original.StudyInstanceUID)
        assert tags["SeriesInstanceUID"] == str(original.SeriesInstanceUID)
    with world.runtime.db.transaction() as session:
        actions = {
            (row.action, row.object_type)
            for row in session.scalars(select(AuditRecord).where(AuditRecord.action.like("%export%")))
        }
    assert {("export.create", "export"), ("phi.export", "patient"), ("export.complete", "export")} <= actions


def test_pacs_down_retries_then_fails_and_a_retry_completes_without_duplicates(world: World) -> None:
    object.__setattr__(world.runtime.settings, "pacs_export_max_attempts", 3)
    server = _orthanc()  # its ports are chosen; it is not started yet: the PACS is down
    try:
        export = _export(world, _destination(world, server.dicom_port))
        _run_jobs(world.runtime)
        first = _follow(world, export["id"])
        assert first["status"] == "retrying"
        assert "unreachable" in first["reason"]
        assert first["next_attempt_at"] is not None
        for _ in range(3):
            _run_jobs(world.runtime, later=timedelta(seconds=10))
        failed = _follow(world, export["id"])
        assert failed["status"] == "failed"
        assert failed["attempts"] == 3
        assert "unreachable" in failed["reason"]
        assert [item["status"] for item in failed["items"]] == ["failed", "failed"]
        server.start()
        retried = world.client.post(
            f"/api/v1/exams/{world.study.study_id}/exports/{export['id']}/retry", headers=world.clinician
        )
        assert retried.status_code == 202
        _run_jobs(world.runtime)
        assert _follow(world, export["id"])["status"] == "completed"
        assert server.instance_count() == 2
        again = world.client.post(
            f"/api/v1/exams/{world.study.study_id}/exports/{export['id']}/retry", headers=world.clinician
        )
        assert (again.status_code, again.json()["code"]) == (409, "export_not_failed")
    finally:
        server.remove()
    with world.runtime.db.transaction() as session:
        fails = session.scalars(select(AuditRecord).where(AuditRecord.action == "export.fail")).all()
    assert len(fails) == 1


class StoreScp:
    """DCMTK's storescp on a free loopback port, writing what it receives to ``directory``."""

    def __init__(self, directory: Path, *, tls: tuple[Path, Path] | None = None) -> None:
        binary = shutil.which("storescp")
        if binary is None:
            unavailable("dcmtk's storescp is not installed (Debian package dcmtk)")
            raise AssertionError  # unreachable
        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        command = [binary, "-aet", "STORESCP", "-od", str(directory)]
        if tls is not None:
            key, cert = tls
            command += ["+tls", str(key), str(cert), "-ic"]
        command.append(str(self.port))
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(lambda: port_open(self.port), timeout=30, what="storescp")

    def received(self) -> list[Path]:
        return sorted(self.directory.iterdir())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def test_a_rerun_sends_only_the_instances_the_pacs_has_not_confirmed(world: World, tmp_path: Path) -> None:
    scp = StoreScp(tmp_path / "received")
    try:
        export = _export(world, _destination(world, scp.port, ae_title="STORESCP"))
        with world.runtime.db.transaction() as session:  # as if an earlier attempt had sent the first
            session.execute(
                update(ExamExportItem)
                .where(ExamExportItem.export_id == export["id"], ExamExportItem.number == 1)
                .values(status="sent")
            )
        _run_jobs(world.runtime)
        assert _follow(world, export["id"])["status"] == "completed"
        received = scp.received()
    finally:
        scp.stop()
    assert len(received) == 1
    assert str(world.study.originals[1].SOPInstanceUID) in received[0].name


def test_an_export_over_dicom_tls_checks_the_pacs_certificate(world: World, tmp_path: Path) -> None:
    authority = TestAuthority("phivault test PACS CA")
    cert, key = tmp_path / "pacs.pem", tmp_path / "pacs.key"
    authority.issue(cert, key, "pacs", names=loopback_names())
    ca_pem = authority.write_certificate(tmp_path / "ca.pem").read_text()
    scp = StoreScp(tmp_path / "received", tls=(key, cert))
    try:
        untrusted = _export(world, _destination(world, scp.port, ae_title="STORESCP", tls=True))
        _run_jobs(world.runtime)
        assert _follow(world, untrusted["id"])["status"] == "retrying"  # no CA: the certificate is refused
        assert scp.received() == []
        trusted = _export(
            world, _destination(world, scp.port, name="trusted", ae_title="STORESCP", tls=True, ca_pem=ca_pem)
        )
        _run_jobs(world.runtime)
        assert _follow(world, trusted["id"])["status"] == "completed"
        received = scp.received()
    finally:
        scp.stop()
    assert len(received) == 2


def test_destinations_are_the_institution_admins_and_checked(world: World) -> None:
    client = world.client
    assert client.get("/api/v1/pacs-destinations", headers=world.clinician).status_code == 403
    destination = _destination(world, 11112)
    assert (
        client.get(f"/api/v1/pacs-destinations/{destination}", headers=world.stranger_admin).status_code
        == 404
    )
    listed = client.get("/api/v1/pacs-destinations", headers=world.admin).json()["items"]
    assert [item["id"] for item in listed] == [destination]
    bad = {"name": "x", "ae_title": "BAD\\TITLE", "host": "127.0.0.1", "port": 104}
    refused = client.post("/api/v1/pacs-destinations", json=bad, headers=world.admin)
    assert (refused.status_code, refused.json()["code"]) == (400, "invalid_ae_title")
    bad_ca = {
        "name": "y",
        "ae_title": "PACS",
        "host": "127.0.0.1",
        "port": 104,
        "tls": True,
        "ca_pem": "nope",
    }
    refused = client.post("/api/v1/pacs-destinations", json=bad_ca, headers=world.admin)
    assert (refused.status_code, refused.json()["code"]) == (400, "pacs_ca_invalid")
    bad_host = {"name": "z", "ae_title": "PACS", "host": "pacs host; rm", "port": 104}
    assert client.post("/api/v1/pacs-destinations", json=bad_host, headers=world.admin).status_code == 400
    changed = client.put(
        f"/api/v1/pacs-destinations/{destination}",
        json={"name": "Renamed", "ae_title": "PACS2", "host": "pacs.example", "port": 11113},
        headers=world.admin,
    )
    assert changed.json()["ae_title"] == "PACS2"
    unknown = client.post(
        f"/api/v1/exams/{world.study.study_id}/exports",
        json={"destination_id": "00000000-0000-4000-8000-000000000000"},
        headers=world.clinician,
    )
    assert unknown.status_code == 404
    assert client.delete(f"/api/v1/pacs-destinations/{destination}", headers=world.admin).status_code == 204
