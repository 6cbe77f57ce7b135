"""Dependencies going away and coming back: 503 problems, the process stays up, recovery."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from phivault.ids import new_id
from servers.common import unavailable
from servers.phivault import PhivaultServer, phivault_env
from servers.postgres import PostgresServer, PostgresUnavailable
from servers.s3 import S3Server

RECOVERY_SECONDS = 60


def _wait_for_status(client: httpx.Client, path: str, status: int) -> httpx.Response:
    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        response = client.get(path)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.3)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    # Its own cluster: this test stops it, which must not disturb the shared one.
    try:
        server = PostgresServer()
        server.start()
    except PostgresUnavailable as exc:
        unavailable(f"PostgreSQL: {exc}")
        raise  # unreachable: unavailable() skips or fails
    yield server
    server.remove()


@pytest.mark.postgres
def test_database_outage_gives_503_and_recovers(tmp_path: Path, own_postgres: PostgresServer) -> None:
    data_dir = tmp_path / "data"
    env = phivault_env(
        data_dir,
        database_url=own_postgres.create_database("main"),
        phi_database_url=own_postgres.create_database("phi"),
    )
    server = PhivaultServer(data_dir, env=env)
    server.start()
    try:
        with server.client() as client:
            assert client.get("/readyz").status_code == 200
            own_postgres.stop()
            down = client.get("/readyz")
            assert down.status_code == 503
            assert down.headers["content-type"] == "application/problem+json"
            assert down.json()["code"] == "not_ready"
            assert down.json()["checks"]["database"] == "unavailable"
            assert down.headers["retry-after"]
            assert client.get("/healthz").status_code == 200  # the process itself is fine
            own_postgres.start()
            assert _wait_for_status(client, "/readyz", 200).status_code == 200
        assert server.process is not None
        assert server.process.poll() is None
        assert "Traceback" not in server.output()
    finally:
        server.kill()


@pytest.mark.s3
def test_object_store_outage_gives_503_and_recovers(tmp_path: Path, s3_server: S3Server) -> None:
    data_dir = tmp_path / "data"
    bucket = s3_server.create_bucket(f"outage-{new_id()[:8]}")
    env = {**phivault_env(data_dir, object_store_url=s3_server.url_for(bucket)), **s3_server.env()}
    server = PhivaultServer(data_dir, env=env)
    server.start()
    try:
        with server.client() as client:
            assert client.get("/readyz").status_code == 200
            s3_server.stop()
            try:
                down = client.get("/readyz")
                assert down.status_code == 503
                assert down.json()["checks"]["object_store"] == "unavailable"
                assert down.json()["checks"]["database"] == "ok"
            finally:
                s3_server.start()
            assert _wait_for_status(client, "/readyz", 200).status_code == 200
        assert "Traceback" not in server.output()
    finally:
        server.kill()
