"""A throwaway S3-protocol server (ministack) on 127.0.0.1 for the test suite.

ministack is an AWS emulator on PyPI. Its dependencies (an older botocore among them) must
not mix with the project's, so it gets its own virtual environment under
``.cache/venvs/ministack`` in the repository, made on first use and reused after that.

The server runs with SERVICES=s3, listens on loopback only (BIND_HOST), and keeps its state
under the work directory given, so ``stop()`` then ``start()`` brings the same buckets and
objects back on the same port. Measured on ministack 1.5.33:

- Object Lock works for PutObject: COMPLIANCE retention is stored, a delete of the locked
  version is refused (403 AccessDenied), GetObjectLockConfiguration answers as S3 does.
- The Object Lock headers of CreateMultipartUpload are ignored: a multipart object comes out
  unlocked (PutObjectRetention afterwards works; phivault's S3 store checks and does that).
- Per-object retention is not persisted: after a restart, locked versions can be deleted.
  Bucket Object Lock configuration, versions and object bodies are persisted.
- It verifies x-amz-checksum-sha256 on PutObject and UploadPart (BadDigest otherwise).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Self

import boto3
from botocore.config import Config

from servers.common import free_port, listening_addresses, process_group
from servers.tools import ToolUnavailableError, ensure_tool_venv

if TYPE_CHECKING:
    from types import TracebackType

    from mypy_boto3_s3 import S3Client

MINISTACK_VERSION = "1.5.33"
# ministack and everything it pulls in, pinned to the set tested together, so a new
# release of a dependency cannot change the server under the tests.
REQUIREMENTS = (
    f"ministack=={MINISTACK_VERSION}",
    "botocore==1.43.106",
    "defusedxml==0.7.1",
    "graphql-core==3.2.12",
    "h11==0.16.0",
    "h2==4.4.1",
    "hpack==4.2.0",
    "hypercorn==0.18.0",
    "hyperframe==6.1.0",
    "jmespath==1.1.0",
    "jsonata-python==0.7.1",
    "priority==2.0.0",
    "python-dateutil==2.9.0.post0",
    "pyyaml==6.0.3",
    "six==1.17.0",
    "urllib3==2.8.0",
    "wsproto==1.3.2",
)

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0


class MinistackUnavailableError(Exception):
    """ministack could not be installed or started."""


def ensure_ministack() -> Path:
    """Return the ``ministack`` executable, installing it into its own venv first if needed."""
    try:
        executable = ensure_tool_venv("ministack", REQUIREMENTS) / "ministack"
    except ToolUnavailableError as exc:
        raise MinistackUnavailableError(str(exc)) from exc
    if not executable.is_file():
        raise MinistackUnavailableError(f"installed, but {executable} is missing")
    return executable


class S3Server:
    """One ministack process serving S3 on ``127.0.0.1:<port>``."""

    # ministack treats the access key it was started with as its root account; signatures
    # are not checked. Throwaway values on loopback, not secrets.
    access_key = "phivault-test"
    secret_key = "phivault-test-secret"
    region = "us-east-1"

    def __init__(self, workdir: Path, *, executable: Path | None = None, port: int | None = None) -> None:
        self.workdir = workdir
        self.executable = executable or ensure_ministack()
        self.port = port or free_port()
        self.log_path = workdir / "ministack.log"
        self._process: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _server_env(self) -> dict[str, str]:
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
            "TMPDIR": str(tmp),  # ministack writes its pid file there
            "LANG": "C.UTF-8",
            "BIND_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.port),
            "SERVICES": "s3",
            "MINISTACK_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "S3_PERSIST": "1",
            "S3_DATA_DIR": str(self.workdir / "s3"),
            "PERSIST_STATE": "1",  # bucket settings (Object Lock) survive stop()/start()
            "STATE_DIR": str(self.workdir / "state"),
            # Listeners and integrations the tests do not use stay off: no other port
            # opens and no Docker daemon is contacted.
            "IOT_MTLS_ENABLED": "0",
            "SFTP_ENABLED": "0",
            "DOCKER_HOST": f"unix://{self.workdir / 'no-docker.sock'}",
            "LOG_LEVEL": "WARNING",
        }

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start the server (again, on the same port) and wait until it answers."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # A session of its own: stop() signals the whole process group.
            self._process = subprocess.Popen(
                [str(self.executable)],
                env=self._server_env(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise MinistackUnavailableError(f"ministack exited with {code}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise MinistackUnavailableError(
                    f"ministack not ready after {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            health = f"{self.endpoint}/_ministack/health"
            with urllib.request.urlopen(health, timeout=1) as response:  # noqa: S310 - http on loopback
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop the server and every process it started; its data stays in ``workdir``."""
        process, self._process = self._process, None
        if process is None:
            return
        # SIGTERM first: ministack saves its state (bucket settings) on shutdown.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while not _exited(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Until it is reaped, the exited server keeps its pid, so the group id cannot
        # have been reused: SIGKILL reaches only what is left of our own processes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

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

    def client(self) -> S3Client:
        """Return a boto3 client, to set up and inspect what the code under test did."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2}),
        )

    def create_bucket(self, name: str, *, object_lock: bool = False) -> str:
        """Create a bucket (versioned, with Object Lock, when asked); return its name."""
        with contextlib.closing(self.client()) as client:
            client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        return name

    def url_for(self, bucket: str, prefix: str = "") -> str:
        """Return the ``PHIVAULT_OBJECT_STORE_URL`` of ``bucket`` (under ``prefix``) on this server."""
        path = f"/{prefix}" if prefix else ""
        return f"s3://{bucket}{path}?endpoint={self.endpoint}&region={self.region}"

    def env(self) -> dict[str, str]:
        """AWS_* variables that make boto3 (in this or another process) use this server's keys."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # Nothing from the developer's ~/.aws, and no instance-metadata lookups.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def listening_addresses(self) -> list[tuple[str, int]]:
        """(address, port) of every TCP socket the server's processes listen on."""
        if self._process is None:
            return []
        return listening_addresses(process_group(self._process.pid))


def start_s3_server(workdir: Path) -> S3Server:
    """Install ministack if needed, start it on a free loopback port, and return it."""
    server = S3Server(workdir)
    server.start()
    return server


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie not yet reaped, or gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")
