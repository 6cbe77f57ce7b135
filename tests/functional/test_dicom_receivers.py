"""Real DICOM peers against a running ``phivault serve``, on SQLite and PostgreSQL:
dicomweb-client's STOW-RS over HTTPS, and DCMTK's ``storescu`` against the C-STORE SCP
(plain and DICOM TLS); the SCP binds only where told, stops cleanly on SIGTERM, and no
instance value reaches the server's log.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from sqlalchemy import select

from factories.accounts import PASSWORD
from factories.dicom_factory import make_instance
from phivault.config.settings import Settings
from phivault.db.engine import Database
from phivault.exams.models import Instance, QuarantinedInstance
from servers import logscan
from servers.common import free_port, listening_addresses, port_open, process_group
from servers.dcmtk import storescu, storescu_binary
from servers.phivault import PHIVAULT, PhivaultServer, phivault_env

MODALITY = "US_ROOM_3"
STUDY = "1.2.826.0.1.3680043.10.1444.21"


@dataclass
class Deployment:
    server: PhivaultServer
    env: dict[str, str]
    institution: str
    token: str
    database_url: str

    def instances(self) -> list[Instance]:
        database = Database(self.database_url)
        try:
            with database.transaction() as session:
                rows = list(session.scalars(select(Instance)))
                session.expunge_all()
                return rows
        finally:
            database.dispose()

    def quarantined(self) -> int:
        database = Database(self.database_url)
        try:
            with database.transaction() as session:
                return len(session.scalars(select(QuarantinedInstance)).all())
        finally:
            database.dispose()


def _cli(*args: str, env: dict[str, str], stdin: str | None = None) -> Any:  # noqa: ANN401  # JSON
    result = subprocess.run(
        [PHIVAULT, *args, "--json"],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _deploy(settings: Settings, **extra: str) -> Deployment:
    port = free_port()
    env = phivault_env(
        settings.data_dir,
        database_url=settings.database_url,
        phi_database_url=settings.phi_database_url,
        public_url=f"https://127.0.0.1:{port}",
        **extra,
    )
    institution = _cli("institution", "create", "Quillfeather Clinic", env=env)["id"]
    _cli(
        "user",
        "create",
        "--institution",
        institution,
        "--email",
        "clinician@example.org",
        "--role",
        "clinician",
        "--password-stdin",
        env=env,
        stdin=PASSWORD + "\n",
    )
    node = _cli("dicom", "node", "add", "--institution", institution, "--ae-title", MODALITY, env=env)
    assert node["ae_title"] == MODALITY
    server = PhivaultServer(settings.data_dir, port=port, env=env)
    server.start()
    with server.client() as client:
        login = client.post(
            "/api/v1/auth/login", json={"email": "clinician@example.org", "password": PASSWORD}
        )
    assert login.status_code == 200, login.text
    return Deployment(server, env, institution, login.json()["access_token"], settings.database_url)


@pytest.fixture
def deployment(settings: Settings) -> Iterator[Deployment]:
    running = _deploy(settings)
    yield running
    running.server.kill()


def _instance(n: int, **kwargs: Any) -> Dataset:  # noqa: ANN401  # make_instance's knobs
    dataset, planted = make_instance(
        study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=f"{STUDY}.1.{n}", **kwargs
    )
    logscan.plant(*planted.values)  # the suite's log scan looks for them in the server's log too
    return dataset


def _write(tmp_path: Path, name: str, dataset: Dataset) -> Path:
    path = tmp_path / f"{name}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def _no_phi_in(server: PhivaultServer) -> None:
    log = server.output()
    assert STUDY not in log
    leaks = logscan.scan([])
    assert [leak for leak in leaks if leak.where == server.log.name] == []


# -- STOW-RS with dicomweb-client ---------------------------------------------------------


def _session(deployment: Deployment) -> requests.Session:
    session = requests.Session()
    # Else REQUESTS_CA_BUNDLE from the environment would replace the test CA (requests#3829).
    session.trust_env = False
    session.verify = str(deployment.server.ca_file)
    return session


def _dicomweb(deployment: Deployment) -> DICOMwebClient:
    session = _session(deployment)
    session.headers["Authorization"] = f"Bearer {deployment.token}"
    return DICOMwebClient(url=f"{deployment.server.base_url}/dicomweb", session=session)


def test_dicomweb_client_stores_over_tls_and_reads_the_store_instances_response(
    deployment: Deployment,
) -> None:
    client = _dicomweb(deployment)
    cine = _instance(2, sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, frames=30)
    response = client.store_instances([_instance(1), cine])
    stored = response.ReferencedSOPSequence
    assert [item.ReferencedSOPInstanceUID for item in stored] == [f"{STUDY}.1.1", f"{STUDY}.1.2"]
    assert "FailedSOPSequence" not in response
    new_uids = {row.sop_instance_uid for row in deployment.instances()}
    assert {item.RetrieveURL.rsplit("/", 1)[1] for item in stored} == new_uids
    assert all(
        item.RetrieveURL.startswith(deployment.server.base_url + "/dicomweb/studies/2.25.") for item in stored
    )

    # One study named in the URL; one instance refused inside a request that stores another.
    missing_uid = _instance(3)
    del missing_uid.SeriesInstanceUID
    mixed = client.store_instances([_instance(4), missing_uid], study_instance_uid=STUDY)
    assert mixed.RetrieveURL.startswith(deployment.server.base_url + "/dicomweb/studies/2.25.")
    (failed,) = mixed.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == (f"{STUDY}.1.3", 0xA900)
    assert failed.ErrorComment == "dicom_missing_uid"
    assert len(deployment.instances()) == 3
    _no_phi_in(deployment.server)


def test_dicomweb_client_without_a_token_is_refused(deployment: Deployment) -> None:
    session = _session(deployment)
    client = DICOMwebClient(url=f"{deployment.server.base_url}/dicomweb", session=session)
    with pytest.raises(requests.HTTPError) as caught:
        client.store_instances([_instance(1)])
    assert caught.value.response is not None
    assert caught.value.response.status_code == 401
    assert deployment.instances() == []


# -- C-STORE with DCMTK's storescu --------------------------------------------------------


def test_storescu_stores_through_the_scp_of_serve(deployment: Deployment, tmp_path: Path) -> None:
    storescu_binary()
    single = _write(tmp_path, "single", _instance(1))
    cine = _write(
        tmp_path, "cine", _instance(2, sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, frames=30)
    )
    sent = storescu(deployment.server.dicom_port, [single, cine], calling=MODALITY)
    assert sent.returncode == 0, sent.output
    rows = deployment.instances()
    assert sorted((row.channel, row.number_of_frames or 1) for row in rows) == [("dimse", 1), ("dimse", 30)]
    assert {row.institution_id for row in rows} == {deployment.institution}
    _no_phi_in(deployment.server)


def test_storescu_gets_the_failure_status_of_an_invalid_instance(
    deployment: Deployment, tmp_path: Path
) -> None:
    storescu_binary()
    broken = _instance(5)
    del broken.StudyInstanceUID
    burned = _instance(6, sop_class=dicom_uid.SecondaryCaptureImageStorage, modality="OT", burned_in="YES")
    # storescu ends the association at the first unsuccessful store: one file per run.
    refused = storescu(
        deployment.server.dicom_port, [_write(tmp_path, "broken", broken)], calling=MODALITY, extra=("-d",)
    )
    assert "DIMSE Status                  : 0xa900" in refused.output, refused.output
    assert "dicom_missing_uid" in refused.output  # Error Comment (0000,0902)
    warned = storescu(
        deployment.server.dicom_port, [_write(tmp_path, "burned", burned)], calling=MODALITY, extra=("-d",)
    )
    assert "DIMSE Status                  : 0xb000" in warned.output, warned.output
    assert "[quarantined]" in warned.output
    assert deployment.instances() == []
    assert deployment.quarantined() == 1
    _no_phi_in(deployment.server)


def test_storescu_with_an_unknown_calling_ae_title_is_rejected_at_association(
    deployment: Deployment, tmp_path: Path
) -> None:
    storescu_binary()
    sent = storescu(deployment.server.dicom_port, [_write(tmp_path, "one", _instance(1))], calling="INTRUDER")
    assert sent.returncode != 0
    assert "Association Rejected" in sent.output, sent.output
    assert "Calling AE Title Not Recognized" in sent.output, sent.output
    assert deployment.instances() == []


def test_storescu_over_dicom_tls(settings: Settings, tmp_path: Path) -> None:
    storescu_binary()
    running = _deploy(settings, dicom_tls="true")
    try:
        file = _write(tmp_path, "one", _instance(1))
        ca = str(running.server.ca_file)
        plain = storescu(running.server.dicom_port, [file], calling=MODALITY)
        assert plain.returncode != 0  # TLS only: a plain association gets nowhere
        sent = storescu(running.server.dicom_port, [file], calling=MODALITY, extra=("+tla", "+cf", ca))
        assert sent.returncode == 0, sent.output
        assert len(running.instances()) == 1
    finally:
        running.server.kill()


def test_the_scp_listens_only_on_the_bind_address_and_stops_on_sigterm(deployment: Deployment) -> None:
    server = deployment.server
    assert server.process is not None
    listening = listening_addresses(process_group(server.process.pid) or [server.process.pid])
    assert ("127.0.0.1", server.dicom_port) in listening
    assert {address for address, _ in listening} == {"127.0.0.1"}
    assert server.terminate(timeout=60) == 0
    assert not port_open(server.dicom_port)
    assert "stopped" in server.output()


def test_serve_can_run_without_the_scp(settings: Settings) -> None:
    running = _deploy(settings, dicom_scp_enabled="false")
    try:
        assert not port_open(running.server.dicom_port)
    finally:
        running.server.kill()


# -- phivault dicom node ------------------------------------------------------------------


def test_dicom_node_commands_add_list_and_remove_without_prompts(tmp_path: Path) -> None:
    env = phivault_env(tmp_path / "data")
    institution = _cli("institution", "create", "Node Clinic", env=env)["id"]
    node = _cli("dicom", "node", "add", "--institution", institution, "--ae-title", "CT_1", env=env)
    assert set(node) == {"id", "institution_id", "ae_title", "device_id", "description", "created_at"}
    assert (node["ae_title"], node["institution_id"], node["device_id"]) == ("CT_1", institution, None)
    assert [row["id"] for row in _cli("dicom", "node", "list", env=env)] == [node["id"]]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PHIVAULT, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    invalid = run("dicom", "node", "add", "--institution", institution, "--ae-title", "BAD\\TITLE")
    assert invalid.returncode == 2
    assert "invalid_ae_title" in invalid.stderr
    taken = run("dicom", "node", "add", "--institution", institution, "--ae-title", "CT_1")
    assert (taken.returncode, "ae_title_taken" in taken.stderr) == (1, True)
    nowhere = run("dicom", "node", "add", "--institution", "no-such-institution", "--ae-title", "CT_2")
    assert (nowhere.returncode, "not_found" in nowhere.stderr) == (1, True)
    assert run("dicom", "node", "remove", node["id"]).returncode == 0
    assert _cli("dicom", "node", "list", env=env) == []
    again = run("dicom", "node", "remove", node["id"])
    assert (again.returncode, "not_found" in again.stderr) == (1, True)
