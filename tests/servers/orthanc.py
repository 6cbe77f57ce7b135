"""A throwaway Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on 127.0.0.1: a hospital
PACS stand-in for export tests and the reference server of the benchmarks.

It runs as the current user with a private configuration: HTTP (REST API and DICOMweb at
``/dicom-web``) and DICOM on free loopback ports, storage in a temporary directory, HTTP
basic authentication with a generated password, and a list of DICOM peers (AE title, host,
port) allowed to send to it. Nothing is read from or written to ``/etc/orthanc``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Self

import httpx

from servers.common import free_port, port_open, wait_until

ORTHANC = "Orthanc"
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
DEBIAN_PACKAGES = "orthanc orthanc-dicomweb"


class OrthancUnavailable(Exception):
    pass


def _plugin() -> Path | None:
    for directory in PLUGIN_DIRS:
        candidate = directory / DICOMWEB_PLUGIN
        if candidate.exists():
            return candidate
    return None


class OrthancServer:
    """Orthanc on free loopback ports; ``rest`` is an authenticated httpx client."""

    def __init__(self, *, ae_title: str = "ORTHANC", peers: dict[str, tuple[str, int]] | None = None) -> None:
        installed = Path("/usr/sbin/Orthanc")
        binary = shutil.which(ORTHANC) or (str(installed) if installed.exists() else None)
        plugin = _plugin()
        if binary is None or plugin is None:
            missing = f"Orthanc with its DICOMweb plugin missing (Debian packages {DEBIAN_PACKAGES})"
            raise OrthancUnavailable(missing)
        self.binary = binary
        self.ae_title = ae_title
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.username = "phivault-test"
        self.password = secrets.token_urlsafe(24)
        self.base = Path(tempfile.mkdtemp(prefix="phivault-orthanc-"))
        self.config = self.base / "orthanc.json"
        self._write_config(plugin, peers or {})
        self._process: subprocess.Popen[bytes] | None = None
        atexit.register(self.remove)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def _write_config(self, plugin: Path, peers: dict[str, tuple[str, int]]) -> None:
        config: dict[str, Any] = {
            "Name": "phivault-test-orthanc",
            "StorageDirectory": str(self.base / "storage"),
            "IndexDirectory": str(self.base / "index"),
            "Plugins": [str(plugin)],
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomModalities": {name: [name, host, port] for name, (host, port) in peers.items()},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "StorageCompression": False,
            "HttpsVerifyPeers": True,
            "StableAge": 1,
            "ConcurrentJobs": 2,
            "HttpThreadsCount": 50,
            "SaveJobs": False,
            "OverwriteInstances": True,
        }
        self.config.write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        if self._process is not None:
            return
        log = (self.base / "orthanc.out").open("ab")
        self._process = subprocess.Popen(
            [self.binary, "--logdir=" + str(self.base), str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base,
            start_new_session=True,
        )
        log.close()
        try:
            wait_until(
                lambda: self._exited() or (port_open(self.http_port) and port_open(self.dicom_port)),
                timeout=60,
                what="Orthanc",
            )
        except TimeoutError:
            self.stop()
            raise
        if self._exited():
            self._process = None
            output = (self.base / "orthanc.out").read_text(errors="replace")[-800:]
            raise OrthancUnavailable(f"Orthanc exited: {output}")

    def _exited(self) -> bool:
        return self._process is not None and self._process.poll() is not None

    def rest(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=60)

    def instance_count(self) -> int:
        with self.rest() as client:
            return int(client.get("/statistics").raise_for_status().json()["CountInstances"])

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()
