"""``phivault serve`` as users run it: HTTPS only, TLS policy, headers, graceful stop."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servers.phivault import PhivaultServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhivaultServer]:
    data_dir = tmp_path_factory.mktemp("serve") / "data"
    running = PhivaultServer(data_dir)
    running.start()
    yield running
    running.kill()


def _client_context(server: PhivaultServer) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.check_hostname = False
    return context


def _handshake(
    server: PhivaultServer, context: ssl.SSLContext
) -> tuple[str | None, tuple[str, str, int] | None]:
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version(), tls.cipher()


def test_first_start_creates_private_data_dir_and_certificate(server: PhivaultServer) -> None:
    assert server.data_dir.stat().st_mode & 0o777 == 0o700
    assert (server.data_dir / "tls" / "cert.pem").exists()
    assert (server.data_dir / "tls" / "key.pem").stat().st_mode & 0o077 == 0


def test_health_and_readiness(server: PhivaultServer) -> None:
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "phi_database": "ok", "object_store": "ok"}


def test_tls13_is_preferred(server: PhivaultServer) -> None:
    version, _ = _handshake(server, _client_context(server))
    assert version == "TLSv1.3"


def test_tls12_offers_only_ecdhe_aead_suites(server: PhivaultServer) -> None:
    context = _client_context(server)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = _handshake(server, context)
    assert version == "TLSv1.2"
    assert cipher is not None
    assert cipher[0].startswith("ECDHE-")
    assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]


@pytest.mark.parametrize(
    "cipher", ["AES128-SHA", "AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"]
)
def test_tls12_refuses_non_ecdhe_or_non_aead_suites(server: PhivaultServer, cipher: str) -> None:
    context = _client_context(server)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(f"{cipher}:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        _handshake(server, context)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")  # the point of the test
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_old_protocol_versions_are_refused(server: PhivaultServer, version: str) -> None:
    context = _client_context(server)
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.minimum_version = ssl.TLSVersion[version]
    context.maximum_version = ssl.TLSVersion[version]
    with pytest.raises(ssl.SSLError):
        _handshake(server, context)


def test_plain_http_gets_no_answer(server: PhivaultServer) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)


def test_security_headers_on_every_response(server: PhivaultServer) -> None:
    with server.client() as client:
        for path in ("/healthz", "/no/such/route", "/api/openapi.json"):
            response = client.get(path)
            assert response.headers["strict-transport-security"].startswith("max-age=63072000")
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert "default-src 'none'" in response.headers["content-security-policy"]
            assert "server" not in response.headers


def test_api_docs_work_offline(server: PhivaultServer) -> None:
    with server.client() as client:
        page = client.get("/api/docs")
        assert page.status_code == 200
        assert "cdn" not in page.text.lower()
        for asset in ("/api/docs/static/swagger-ui-bundle.js", "/api/docs/static/local/docs.js"):
            assert client.get(asset).status_code == 200
        spec = client.get("/api/openapi.json").json()
    assert {"/healthz", "/readyz"} <= set(spec["paths"])


def test_unknown_route_and_method_are_problems(server: PhivaultServer) -> None:
    with server.client() as client:
        missing = client.get("/api/v1/nothing-here")
        wrong_method = client.post("/healthz", content=b"{not json")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["code"] == "method_not_allowed"


def test_access_log_names_routes_not_paths_or_queries(server: PhivaultServer) -> None:
    with server.client() as client:
        client.get("/healthz", params={"PatientName": "DOE^JANE", "token": "s3cr3t-share-token"})
        client.get("/share/s3cr3t-share-token")
    log = server.output()
    assert "GET /healthz 200" in log
    assert "DOE" not in log
    assert "s3cr3t-share-token" not in log


def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    running = PhivaultServer(tmp_path / "data")
    running.start()
    try:
        with running.client() as client:
            assert client.get("/healthz").status_code == 200
        assert running.terminate() == 0
        assert "job worker" in running.output()
        assert "phivault stopped" in running.output()
    finally:
        running.kill()
