"""Sharing and export against a running ``phivault serve`` (SQLite and PostgreSQL): exams
stored over STOW-RS, a share link opened from outside without credentials carries none of
the planted PHI, and an export reaches a real Orthanc re-identified; the server's log holds
neither PHI nor the link's token.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread

from factories.accounts import PASSWORD, bearer, enrol_totp
from factories.dicom_factory import PATIENT_NAME, make_instance
from phivault.config.settings import Settings
from servers import logscan
from servers.common import free_port, unavailable
from servers.orthanc import OrthancServer, OrthancUnavailable
from servers.phivault import PHIVAULT, PhivaultServer, phivault_env

STUDY = "1.2.826.0.1.3680043.10.1444.31"


@dataclass
class Deployment:
    server: PhivaultServer
    clinician: str
    admin: str


def _cli(*args: str, env: dict[str, str], stdin: str | None = None) -> Any:  # noqa: ANN401  # JSON
    result = subprocess.run(  # the installed phivault command
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


def _user(env: dict[str, str], institution: str, email: str, role: str) -> None:
    _cli(
        "user",
        "create",
        "--institution",
        institution,
        "--email",
        email,
        "--role",
        role,
        "--password-stdin",
        env=env,
        stdin=PASSWORD + "\n",
    )


def _admin_token(client: httpx.Client, email: str) -> str:
    """An institution admin's token: TOTP set up at first sign-in, then a recovery code as
    the second factor (the enrolment spent the current TOTP step).
    """
    first = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert first.status_code == 200, first.text
    _, recovery = enrol_totp(client, first.json()["access_token"], datetime.now(UTC))
    again = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert again.json()["code"] == "mfa_required", again.text
    verified = client.post(
        "/api/v1/auth/mfa/verify", json={"mfa_token": again.json()["mfa_token"], "code": recovery[0]}
    )
    assert verified.status_code == 200, verified.text
    token: str = verified.json()["access_token"]
    return token


@pytest.fixture
def deployment(settings: Settings) -> Iterator[Deployment]:
    port = free_port()
    env = phivault_env(
        settings.data_dir,
        database_url=settings.database_url,
        phi_database_url=settings.phi_database_url,
        public_url=f"https://127.0.0.1:{port}",
        job_poll_seconds="0.2",
    )
    institution = _cli("institution", "create", "Quillfeather Clinic", env=env)["id"]
    _user(env, institution, "clinician@example.org", "clinician")
    _user(env, institution, "admin@example.org", "institution_admin")
    server = PhivaultServer(settings.data_dir, port=port, env=env)
    server.start()
    try:
        with server.client() as client:
            login = client.post(
                "/api/v1/auth/login", json={"email": "clinician@example.org", "password": PASSWORD}
            )
            assert login.status_code == 200, login.text
            admin = _admin_token(client, "admin@example.org")
        yield Deployment(server, login.json()["access_token"], admin)
    finally:
        server.kill()


def _store_study(deployment: Deployment) -> list[str]:
    session = requests.Session()
    session.trust_env = False
    session.verify = str(deployment.server.ca_file)
    session.headers["Authorization"] = f"Bearer {deployment.clinician}"
    dicomweb = DICOMwebClient(url=f"{deployment.server.base_url}/dicomweb", session=session)
    planted: list[str] = []
    datasets = []
    for n in (1, 2):
        dataset, values = make_instance(study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=f"{STUDY}.1.{n}")
        logscan.plant(*values.values)
        planted += values.values
        datasets.append(dataset)
    dicomweb.store_instances(datasets)
    return sorted(set(planted))


def test_a_share_opened_from_outside_and_an_export_to_orthanc(deployment: Deployment) -> None:
    planted = _store_study(deployment)
    server = deployment.server
    try:
        orthanc = OrthancServer(peers={"PHIVAULT": ("127.0.0.1", 104)})
        orthanc.start()
    except OrthancUnavailable as exc:
        unavailable(str(exc))
        raise
    try:
        with server.client() as client:
            clinician = bearer(deployment.clinician)
            (exam,) = client.get("/api/v1/exams", headers=clinician).json()["items"]
            expires = (datetime.now(UTC) + timedelta(days=3)).isoformat()
            share = client.post(
                f"/api/v1/exams/{exam['id']}/shares",
                json={"expires_at": expires, "mode": "download"},
                headers=clinician,
            ).json()
            token = share["url"].rsplit("/", 1)[1]
            logscan.plant(token)
            # The recipient: another client, no credentials, no cookies.
            with server.client() as outside:
                responses = [outside.get(share["url"])]
                listing = outside.get(share["url"], headers={"Accept": "application/json"})
                responses.append(listing)
                for item in listing.json()["instances"]:
                    responses.append(outside.get(item["download"]))
                    responses.append(outside.get(item["rendered"], headers={"Accept": "image/png"}))
            assert [r.status_code for r in responses] == [200] * 6
            for response in responses:
                content = response.content.lower() + str(response.headers).lower().encode()
                assert [v for v in planted if v.lower().encode() in content] == []
                if response.headers["content-type"] == "application/dicom":
                    assert dcmread(io.BytesIO(response.content)).PatientIdentityRemoved == "YES"
                if response.headers["content-type"] == "image/png":
                    assert Image.open(io.BytesIO(response.content)).info.keys() <= {"dpi"}

            destination = client.post(
                "/api/v1/pacs-destinations",
                json={
                    "name": "Orthanc",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                },
                headers=bearer(deployment.admin),
            )
            assert destination.status_code == 201, destination.text
            export = client.post(
                f"/api/v1/exams/{exam['id']}/exports",
                json={"destination_id": destination.json()["id"]},
                headers=clinician,
            ).json()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                followed = client.get(
                    f"/api/v1/exams/{exam['id']}/exports/{export['id']}", headers=clinician
                ).json()
                if followed["status"] in ("completed", "failed"):
                    break
                time.sleep(0.5)
            assert followed["status"] == "completed", followed
        with orthanc.rest() as rest:
            names = {
                rest.get(f"/instances/{i}/simplified-tags").json()["PatientName"]
                for i in rest.get("/instances").json()
            }
        assert names == {PATIENT_NAME}
    finally:
        orthanc.remove()
    log = server.output()
    assert token not in log
    assert [v for v in planted if v in log] == []
