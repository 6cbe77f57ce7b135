"""An external TLS scan (sslyze) of a real ``phivault serve``: the policy of DESIGN.md §4,
checked from outside by a tool that speaks every protocol version, including the broken ones.

The server runs with a certificate issued by a throwaway test CA, as it does in production
(PHIVAULT_TLS_CERT_FILE/_KEY_FILE), and sslyze trusts that CA (its ``custom_ca_file``). So the
Mozilla profile is checked whole, certificate path validation included. The dev profile's
self-signed certificate would not pass that part: sslyze 6 validates with cryptography's
RFC 5280 web-PKI verifier, which requires an Authority Key Identifier that the dev
certificate does not carry; the TLS settings under test are the same for both certificates.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from servers.phivault import PhivaultServer, phivault_env
from servers.pki import TestAuthority, loopback_names
from servers.tools import SSLYZE, require_tool

pytestmark = pytest.mark.security

SCAN_SCRIPT = Path(__file__).with_name("sslyze_scan.py")
SCAN_TIMEOUT = 120
# RFC 8446 §B.4 suites and, for TLS 1.2, ECDHE key exchange with an AEAD cipher only.
TLS13_AEAD_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
TLS12_ECDHE_AEAD = re.compile(
    r"^TLS_ECDHE_(ECDSA|RSA)_WITH_(AES_(128|256)_GCM_SHA(256|384)|CHACHA20_POLY1305_SHA256)$"
)
ROBOT_SAFE = {"NOT_VULNERABLE_NO_ORACLE", "NOT_VULNERABLE_RSA_NOT_SUPPORTED"}


@dataclass(frozen=True, slots=True)
class IssuedCertificates:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class TlsScan:
    """What sslyze_scan.py printed: sslyze's own JSON of the scan, and the profile check."""

    sslyze_version: str
    results: dict[str, Any] = field(repr=False)
    mozilla_profile: str = field(repr=False)
    mozilla_issues: dict[str, str] = field(repr=False)
    mozilla_incomplete: str | None = field(repr=False)
    hsts_min_age: int = field(repr=False)

    def result(self, command: str) -> dict[str, Any]:
        """The result of one scan command; fails the test if sslyze could not run it."""
        attempt = self.results[command]
        assert attempt["status"] == "COMPLETED", (
            f"sslyze {command}: {attempt['status']} {attempt['error_reason']}\n{attempt['error_trace']}"
        )
        result: dict[str, Any] = attempt["result"]
        return result


def _issue_certificates(directory: Path) -> IssuedCertificates:
    """A P-256 test CA and a 90-day server certificate for 127.0.0.1 issued by it (RFC 5280 profile)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    authority = TestAuthority("phivault test CA")
    certificates = IssuedCertificates(
        ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem"
    )
    authority.write_certificate(certificates.ca)
    authority.issue(certificates.cert, certificates.key, "127.0.0.1", names=loopback_names())
    return certificates


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> TlsScan:
    sslyze_bin = require_tool("sslyze", SSLYZE)
    base = tmp_path_factory.mktemp("tls-scan")
    certificates = _issue_certificates(base / "pki")
    data_dir = base / "data"
    env = phivault_env(data_dir, tls_cert_file=str(certificates.cert), tls_key_file=str(certificates.key))
    server = PhivaultServer(data_dir, env=env)
    server.start()
    try:
        completed = subprocess.run(
            [
                str(sslyze_bin / "python"),
                str(SCAN_SCRIPT),
                "--host=127.0.0.1",
                f"--port={server.port}",
                f"--ca-file={certificates.ca}",
                "--profile=intermediate",
            ],
            capture_output=True,
            text=True,
            timeout=SCAN_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    finally:
        server.kill()
    (base / "sslyze.json").write_text(completed.stdout)
    assert completed.returncode == 0, (
        f"sslyze_scan.py exited {completed.returncode}:\n{completed.stderr[-3000:]}"
    )
    printed = json.loads(completed.stdout)
    scanned = printed["scan"]
    assert scanned["connectivity_status"] == "COMPLETED", scanned["connectivity_error_trace"]
    assert scanned["scan_status"] == "COMPLETED", scanned
    return TlsScan(
        sslyze_version=printed["sslyze_version"],
        results=scanned["scan_result"],
        mozilla_profile=printed["mozilla"]["profile"],
        mozilla_issues=printed["mozilla"]["issues"],
        mozilla_incomplete=printed["mozilla"]["incomplete"],
        hsts_min_age=printed["mozilla"]["hsts_min_age"],
    )


def _accepted_suites(scan: TlsScan, command: str) -> list[str]:
    return [accepted["cipher_suite"]["name"] for accepted in scan.result(command)["accepted_cipher_suites"]]


@pytest.mark.parametrize(
    "command",
    ["ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"],
)
def test_legacy_protocol_versions_are_refused(scan: TlsScan, command: str) -> None:
    result = scan.result(command)
    assert not result["is_tls_version_supported"], _accepted_suites(scan, command)


@pytest.mark.parametrize("command", ["tls_1_2_cipher_suites", "tls_1_3_cipher_suites"])
def test_tls12_and_tls13_are_accepted(scan: TlsScan, command: str) -> None:
    assert scan.result(command)["is_tls_version_supported"]


def test_tls12_accepts_only_ecdhe_aead_suites(scan: TlsScan) -> None:
    accepted = _accepted_suites(scan, "tls_1_2_cipher_suites")
    assert accepted
    assert [suite for suite in accepted if not TLS12_ECDHE_AEAD.fullmatch(suite)] == []


def test_tls13_accepts_only_standard_aead_suites(scan: TlsScan) -> None:
    accepted = set(_accepted_suites(scan, "tls_1_3_cipher_suites"))
    assert accepted
    assert accepted <= TLS13_AEAD_SUITES


def test_tls_compression_is_off(scan: TlsScan) -> None:
    # CRIME: compression before encryption leaks secrets through the record length.
    assert not scan.result("tls_compression")["supports_compression"]


def test_renegotiation_is_secure_and_never_client_initiated(scan: TlsScan) -> None:
    result = scan.result("session_renegotiation")
    assert result["supports_secure_renegotiation"]  # RFC 5746: no insecure renegotiation
    assert not result["is_vulnerable_to_client_renegotiation_dos"]
    assert result["client_renegotiations_success_count"] == 0


def test_not_vulnerable_to_heartbleed_robot_or_ccs_injection(scan: TlsScan) -> None:
    assert not scan.result("heartbleed")["is_vulnerable_to_heartbleed"]
    assert scan.result("robot")["robot_result"] in ROBOT_SAFE
    assert not scan.result("openssl_ccs_injection")["is_vulnerable_to_ccs_injection"]


def test_downgrade_protection_and_extended_master_secret(scan: TlsScan) -> None:
    assert scan.result("tls_fallback_scsv")["supports_fallback_scsv"]  # RFC 7507
    assert scan.result("tls_extended_master_secret")["supports_ems_extension"]  # RFC 7627


def test_hsts_header_meets_the_profile(scan: TlsScan) -> None:
    hsts = scan.result("http_headers")["strict_transport_security_header"]
    assert hsts is not None, "no Strict-Transport-Security header"
    # sslyze's profile check skips HSTS (few sites follow it); we do follow it.
    assert hsts["max_age"] is not None
    assert hsts["max_age"] >= scan.hsts_min_age
    assert hsts["include_subdomains"]


def test_complies_with_mozilla_intermediate_profile(scan: TlsScan) -> None:
    assert scan.mozilla_incomplete is None
    issues = "\n".join(f"- {name}: {text}" for name, text in sorted(scan.mozilla_issues.items()))
    assert not scan.mozilla_issues, (
        f"not compliant with Mozilla {scan.mozilla_profile!r} (sslyze {scan.sslyze_version}):\n{issues}"
    )
