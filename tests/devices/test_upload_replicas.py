"""Two phivault replicas on one PostgreSQL and one S3 bucket: an upload begun on one is
continued, resumed and finalized on the other (no state lives in a process).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from factories.accounts import LOOPBACK, AccountsFactory
from factories.devices import TUS, DeviceKey, DeviceSession, issue_code
from factories.dicom_factory import make_instance, to_bytes
from phivault.clock import ManualClock
from phivault.config.settings import load_settings
from phivault.ids import new_id
from phivault.runtime import Runtime, build_runtime, initialise
from phivault.web.app import create_app
from servers.postgres import PostgresServer
from servers.s3 import S3Server

pytestmark = [pytest.mark.postgres, pytest.mark.s3]
CHUNK = 16 * 1024


@pytest.fixture
def replicas(
    tmp_path: Path,
    postgres_server: PostgresServer,
    s3_server: S3Server,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Runtime, TestClient, TestClient]]:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    suffix = new_id().replace("-", "")[:12]
    bucket = s3_server.create_bucket(f"devices-{suffix}")
    shared = {
        "database_url": postgres_server.create_database(f"main_{suffix}"),
        "phi_database_url": postgres_server.create_database(f"phi_{suffix}"),
        "object_store_url": s3_server.url_for(bucket),
    }
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    first = build_runtime(load_settings(data_dir=data, **shared), clock=clock)
    initialise(first)
    second = build_runtime(load_settings(data_dir=data, **shared), clock=clock)
    try:
        with (
            TestClient(create_app(first), base_url="https://testserver", client=LOOPBACK) as a,
            TestClient(create_app(second), base_url="https://testserver", client=LOOPBACK) as b,
        ):
            yield first, a, b
    finally:
        second.close()
        first.close()


def test_an_upload_moves_between_replicas_and_arrives_once(
    replicas: tuple[Runtime, TestClient, TestClient],
) -> None:
    runtime, a, b = replicas
    institution = AccountsFactory(runtime).institution("Replicated Clinic").id
    key = DeviceKey(clock=lambda: runtime.clock.now().timestamp())
    on_a = DeviceSession(a, key)
    assert on_a.activate(issue_code(runtime, institution)).status_code == 200
    on_b = DeviceSession(b, key, token=on_a.token, nonce=on_a.nonce)  # the same device, another replica
    dataset, _ = make_instance(frames=6)
    data = to_bytes(dataset)
    upload_id = on_a.create_upload(len(data)).json()["id"]
    for index, start in enumerate(range(0, len(data), CHUNK)):
        device = (on_a, on_b)[index % 2]
        head = device.send("HEAD", f"/api/v1/uploads/{upload_id}", headers=TUS)
        assert head.headers["upload-offset"] == str(start)
        assert device.patch(upload_id, start, data[start : start + CHUNK]).status_code == 204
    receipt = on_b.finalize(upload_id, hashlib.sha256(data).hexdigest())
    assert receipt.status_code == 200, receipt.text
    again = on_a.finalize(upload_id, hashlib.sha256(data).hexdigest())
    assert again.json() == receipt.json()
    assert receipt.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert list(runtime.store.keys(f"upload/{upload_id}/")) == []
