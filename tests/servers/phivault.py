"""A real ``phivault serve`` process for functional tests, on a free loopback port."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx

from servers.common import free_port, port_open, wait_until
from servers.logscan import register_log_file

PHIVAULT = str(Path(sys.executable).with_name("phivault"))


def phivault_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a phivault process: this one's, minus PHIVAULT_*, plus ``settings``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PHIVAULT_")}
    env["PHIVAULT_DATA_DIR"] = str(data_dir)
    env.update({f"PHIVAULT_{name.upper()}": value for name, value in settings.items()})
    return env


class PhivaultServer:
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        dicom_port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.dicom_port = dicom_port or free_port()  # the C-STORE SCP's; never the shared 11112
        self.env = dict(env) if env is not None else phivault_env(data_dir)
        self.log = data_dir.parent / f"serve-{self.port}.log"
        register_log_file(self.log)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return Path(self.env.get("PHIVAULT_TLS_CERT_FILE") or self.data_dir / "tls" / "cert.pem")

    def start(self, timeout: float = 60) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [PHIVAULT, "serve", "--port", str(self.port), "--dicom-port", str(self.dicom_port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_until(self._listening, timeout=timeout, what=f"phivault serve on {self.port}")
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"phivault serve did not start:\n{self.output()[-3000:]}") from None

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"phivault serve exited with {self.process.returncode}:\n{self.output()[-3000:]}"
            )
        return port_open(self.port)

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, verify=ssl.create_default_context(cafile=self.ca_file), timeout=30
        )

    def terminate(self, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
