"""Scan one TLS server with sslyze and print the result as JSON on standard output.

Runs inside sslyze's own virtual environment (``tests/servers/tools.py``), not the project's:
``<venv>/bin/python sslyze_scan.py --host 127.0.0.1 --port 8443 --ca-file ca.pem``.
``test_tls_scan.py`` starts it and reads what it prints:

``{"sslyze_version", "scan": <sslyze's JSON of the server scan, as ``--json_out`` writes it>,
"mozilla": {"profile", "hsts_min_age", "issues": {name: text}, "incomplete": text | null}}``

The Python API is used instead of the command line because only it returns the findings of
the Mozilla profile check as data (the command line prints them as prose).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# sslyze is not installed in the project's environment, where mypy runs.
from sslyze import (  # type: ignore[import-not-found]
    CertificateInfoExtraArgument,
    ScanCommand,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanResultAsJson,
)
from sslyze.__version__ import __version__ as sslyze_version  # type: ignore[import-not-found]
from sslyze.mozilla_tls_profile.tls_config_checker import (  # type: ignore[import-not-found]
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    ServerScanResultIncomplete,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca-file", type=Path, required=True, help="trust anchor for certificate validation")
    parser.add_argument("--profile", default="intermediate", choices=["modern", "intermediate", "old"])
    args = parser.parse_args()

    request = ServerScanRequest(
        server_location=ServerNetworkLocation(hostname=args.host, port=args.port),
        # The profile's commands (protocols, suites, curves, certificate, vulnerabilities) plus the
        # HSTS header, which sslyze's profile check leaves out.
        scan_commands={*SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER, ScanCommand.HTTP_HEADERS},
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=args.ca_file)
        ),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    results = list(scanner.get_results())
    if len(results) != 1:
        sys.stderr.write(f"expected one scan result, got {len(results)}\n")
        return 2
    result = results[0]

    profile = MozillaTlsConfiguration.get(TlsConfigurationEnum(args.profile))
    issues: dict[str, str] = {}
    incomplete: str | None = None
    try:
        check_server_against_tls_configuration(result, profile)
    except ServerNotCompliantWithTlsConfiguration as exc:
        issues = dict(exc.issues)
    except ServerScanResultIncomplete as exc:
        incomplete = str(exc)

    output = {
        "sslyze_version": sslyze_version,
        "scan": ServerScanResultAsJson.model_validate(result).model_dump(mode="json"),
        "mozilla": {
            "profile": args.profile,
            "hsts_min_age": profile.hsts_min_age,
            "issues": issues,
            "incomplete": incomplete,
        },
    }
    sys.stdout.write(json.dumps(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
