"""Slow clients (slowloris) cannot hold the server: header deadline and connection limit."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers.phivault import PhivaultServer, phivault_env

HEADER_TIMEOUT = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhivaultServer]:
    data_dir = tmp_path_factory.mktemp("slow") / "data"
    env = phivault_env(data_dir, http_header_timeout_seconds=str(HEADER_TIMEOUT), http_max_connections="20")
    running = PhivaultServer(data_dir, env=env)
    running.start()
    yield running
    running.kill()


def _tls(server: PhivaultServer) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _closed_by_server(connection: ssl.SSLSocket, within: float) -> bool:
    """Keep dribbling header lines; True once the server has closed the connection."""
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            connection.send(b"X-Slow: 1\r\n")
            connection.settimeout(0.5)
            try:
                if connection.recv(1) == b"":
                    return True
            except TimeoutError:
                pass
    except (OSError, ssl.SSLError):
        return True
    return False


def test_a_client_dribbling_headers_is_disconnected(server: PhivaultServer) -> None:
    connection = _tls(server)
    connection.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    assert _closed_by_server(connection, within=HEADER_TIMEOUT * 5)
    connection.close()


def test_many_slow_clients_do_not_lock_out_others(server: PhivaultServer) -> None:
    attackers = [_tls(server) for _ in range(40)]  # twice the connection limit
    try:
        for attacker in attackers:
            attacker.send(b"GET /healthz HTTP/1.1\r\n")
        # While they hold their connections, others are answered (200, or 503 at the limit)
        # rather than left hanging; once the deadline cuts the attackers, 200 again.
        with server.client() as client:
            assert client.get("/healthz").status_code in (200, 503)
            time.sleep(HEADER_TIMEOUT + 1)
            assert client.get("/healthz").status_code == 200
    finally:
        for attacker in attackers:
            attacker.close()


def test_normal_requests_are_unaffected(server: PhivaultServer, tmp_path: Path) -> None:
    del tmp_path
    with server.client() as client:
        for _ in range(5):
            assert client.get("/healthz").status_code == 200
