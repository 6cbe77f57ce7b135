"""dicomweb-client against a running ``phivault serve``, on SQLite and PostgreSQL: it stores a
study (STOW-RS), finds it (QIDO-RS), and retrieves the instance, frames and a rendered frame
(WADO-RS) over HTTPS, as a clinician of the owning institution; no instance value reaches the
server's log.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset

from factories.accounts import PASSWORD
from factories.dicom_factory import PATIENT_ID, PATIENT_NAME, make_instance
from factories.exams import stored_pixels
from phivault.config.settings import Settings
from servers import logscan
from servers.common import free_port
from servers.phivault import PHIVAULT, PhivaultServer, phivault_env

STUDY = "1.2.826.0.1.3680043.10.1444.80"


@dataclass
class Deployment:
    server: PhivaultServer
    token: str


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


@pytest.fixture
def deployment(settings: Settings) -> Iterator[Deployment]:
    port = free_port()
    env = phivault_env(
        settings.data_dir,
        database_url=settings.database_url,
        phi_database_url=settings.phi_database_url,
        public_url=f"https://127.0.0.1:{port}",
    )
    institution = _cli("institution", "create", "Zelq Imaging", env=env)["id"]
    email = "reader@example.org"
    _cli(
        "user",
        "create",
        "--institution",
        institution,
        "--email",
        email,
        "--role",
        "clinician",
        "--password-stdin",
        env=env,
        stdin=PASSWORD + "\n",
    )
    server = PhivaultServer(settings.data_dir, port=port, env=env)
    server.start()
    try:
        with server.client() as client:
            login = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert login.status_code == 200, login.text
        yield Deployment(server, login.json()["access_token"])
    finally:
        server.kill()


def _client(deployment: Deployment) -> DICOMwebClient:
    session = requests.Session()
    # Else REQUESTS_CA_BUNDLE from the environment would replace the test CA (requests#3829).
    session.trust_env = False
    session.verify = str(deployment.server.ca_file)
    session.headers["Authorization"] = f"Bearer {deployment.token}"
    return DICOMwebClient(url=f"{deployment.server.base_url}/dicomweb", session=session)


def _cine() -> Dataset:
    dataset, planted = make_instance(
        study_uid=STUDY,
        series_uid=f"{STUDY}.1",
        sop_uid=f"{STUDY}.1.1",
        sop_class=dicom_uid.UltrasoundMultiFrameImageStorage,
        frames=12,
        rows=120,
        columns=160,
    )
    logscan.plant(*planted.values)  # the suite's log scan looks for them in the server's log
    return dataset


def test_dicomweb_client_searches_retrieves_frames_and_rendered(deployment: Deployment) -> None:
    client = _client(deployment)
    stored = client.store_instances([_cine()])
    assert "FailedSOPSequence" not in stored

    (study,) = client.search_for_studies(search_filters={"PatientID": PATIENT_ID})
    assert study["00100010"]["Value"][0]["Alphabetic"] == PATIENT_NAME
    assert study["0020000D"]["Value"] == [STUDY]
    assert client.search_for_studies(search_filters={"PatientName": "Quix*"}) != []
    assert client.search_for_studies(search_filters={"PatientName": "Nobody*"}) == []
    (instance,) = client.search_for_instances(study_instance_uid=STUDY)
    series_uid = instance["0020000E"]["Value"][0]
    sop_uid = instance["00080018"]["Value"][0]

    retrieved = client.retrieve_instance(STUDY, series_uid, sop_uid)
    assert (retrieved.PatientName, retrieved.SOPInstanceUID) == (PATIENT_NAME, f"{STUDY}.1.1")
    expected = stored_pixels(120, 160, 12, rgb=True)
    assert retrieved.PixelData == expected.tobytes()

    frames = client.retrieve_instance_frames(STUDY, series_uid, sop_uid, frame_numbers=[7, 12])
    assert frames == [expected[6].tobytes(), expected[11].tobytes()]

    rendered = client.retrieve_instance_frames_rendered(
        STUDY, series_uid, sop_uid, frame_numbers=[7], media_types=("image/png",)
    )
    image = Image.open(io.BytesIO(rendered))
    assert (image.format, image.size) == ("PNG", (160, 120))
    jpeg = client.retrieve_instance_rendered(STUDY, series_uid, sop_uid, media_types=("image/jpeg",))
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"

    metadata: dict[str, Any] = client.retrieve_instance_metadata(STUDY, series_uid, sop_uid)
    assert metadata["00100020"]["Value"] == [PATIENT_ID]
    log = deployment.server.output()
    assert PATIENT_NAME not in log
    assert PATIENT_ID not in log
