"""A throwaway rsyslog (Debian ``rsyslog`` + ``rsyslog-gnutls``) receiving RFC 5425 syslog
over TLS on 127.0.0.1, standing in for a customer's SIEM.

It runs as the current user with a private configuration: only ``imtcp`` with the GnuTLS
network stream driver (``StreamDriver.Mode=1``: TLS only), listening on loopback, and one
``omfile`` action writing each received message verbatim (``%rawmsg%``) to a file. No
``imuxsock``/``imklog``: it never touches the system log. The server certificate comes from a
throwaway CA made here with ``cryptography``; clients verify it against ``ca_file``.

``stop()`` then ``start()`` restarts it on the same port and appends to the same file, so
tests can take the "SIEM" down and bring it back.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from servers.common import free_port, listening_sockets, port_open, wait_until
from servers.pki import CLIENT_AUTH, TestAuthority, loopback_names

RSYSLOGD = "rsyslogd"
GTLS_MODULE_DIRS = (Path("/usr/lib/x86_64-linux-gnu/rsyslog"), Path("/usr/lib/aarch64-linux-gnu/rsyslog"))
DEBIAN_PACKAGES = "rsyslog rsyslog-gnutls"


class RsyslogUnavailable(Exception):
    pass


def _gtls_installed() -> bool:
    return any((directory / "lmnsd_gtls.so").exists() for directory in GTLS_MODULE_DIRS)


class RsyslogServer:
    """rsyslogd on a free loopback port, TLS only, messages appended to ``received``."""

    def __init__(self, *, require_client_cert: bool = False) -> None:
        # x509/certvalid: a client must present a certificate issued by our CA (mutual TLS).
        self.auth_mode = "x509/certvalid" if require_client_cert else "anon"
        binary = shutil.which(RSYSLOGD) or (
            "/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None
        )
        if binary is None or not _gtls_installed():
            raise RsyslogUnavailable(f"rsyslogd with GnuTLS missing (Debian packages {DEBIAN_PACKAGES})")
        self.binary = binary
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="phivault-rsyslog-"))
        self.received = self.base / "received.log"
        self.ca_file = self.base / "ca.pem"
        self.client_cert_file = self.base / "client-cert.pem"
        self.client_key_file = self.base / "client-key.pem"
        self._make_certificates()
        self.config = self.base / "rsyslog.conf"
        self.config.write_text(self._config_text())
        self.pidfile = self.base / "rsyslogd.pid"
        self._process: subprocess.Popen[bytes] | None = None
        atexit.register(self.remove)

    @property
    def url(self) -> str:
        return f"syslog+tls://127.0.0.1:{self.port}"

    def _make_certificates(self) -> None:
        authority = TestAuthority("phivault test SIEM CA")
        authority.write_certificate(self.ca_file)
        authority.issue(
            self.base / "server-cert.pem", self.base / "server-key.pem", "127.0.0.1", names=loopback_names()
        )
        authority.issue(
            self.base / "client-cert.pem",
            self.base / "client-key.pem",
            "phivault-test-client",
            names=[x509.DNSName("phivault-test-client")],
            usage=CLIENT_AUTH,
        )

    def _config_text(self) -> str:
        base = self.base
        return f"""
global(
  workDirectory="{base}"
  maxMessageSize="64k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{self.ca_file}"
  defaultNetstreamDriverCertFile="{base / "server-cert.pem"}"
  defaultNetstreamDriverKeyFile="{base / "server-key.pem"}"
)
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="{self.auth_mode}")
input(type="imtcp" address="127.0.0.1" port="{self.port}")
template(name="raw" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{self.received}" template="raw")
"""

    def start(self) -> None:
        if self._process is not None:
            return
        self.pidfile.unlink(missing_ok=True)
        log = (self.base / "rsyslogd.out").open("ab")
        self._process = subprocess.Popen(
            [self.binary, "-n", "-f", str(self.config), "-i", str(self.pidfile)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base,
            start_new_session=True,
        )
        log.close()
        try:
            wait_until(lambda: self._exited() or port_open(self.port), timeout=20, what="rsyslogd")
        except TimeoutError:
            self.stop()
            raise
        if self._exited():
            self._process = None
            output = (self.base / "rsyslogd.out").read_text(errors="replace")[-800:]
            raise RsyslogUnavailable(f"rsyslogd exited: {output}")

    def _exited(self) -> bool:
        return self._process is not None and self._process.poll() is not None

    def stop(self) -> None:
        """Stop rsyslogd (SIGTERM: it flushes its queue and closes the output file)."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        wait_until(lambda: not port_open(self.port), timeout=10, what="rsyslogd port closed")

    def listening_addresses(self) -> set[str]:
        """Local addresses rsyslogd listens on at our port (from /proc/net/tcp{,6})."""
        return {address for address, port in listening_sockets().values() if port == self.port}

    def messages(self) -> list[str]:
        if not self.received.exists():
            return []
        return [line for line in self.received.read_text(encoding="utf-8").splitlines() if line]

    def wait_for_messages(self, count: int, timeout: float = 20) -> list[str]:
        """Wait until at least ``count`` messages were written, then return all of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages()
            if len(found) >= count:
                return found
            time.sleep(0.05)
        found = self.messages()
        raise TimeoutError(f"rsyslogd wrote {len(found)} of {count} messages within {timeout:.0f} s")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __repr__(self) -> str:
        return f"RsyslogServer(port={self.port}, pid={os.getpid()})"


@dataclass(frozen=True)
class SyslogMessage:
    """An RFC 5424 message parsed back (§6), with §6.3.3 escapes undone."""

    facility: int
    severity: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: dict[str, dict[str, str]]
    msg: str | None


_HEADER = re.compile(r"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) ")


def parse_syslog(line: str) -> SyslogMessage:
    """Parse one RFC 5424 SYSLOG-MSG strictly; raise ValueError on any deviation."""
    header = _HEADER.match(line)
    if header is None:
        raise ValueError(f"not an RFC 5424 header: {line[:80]!r}")
    pri = int(header.group(1))
    if pri > 191:  # §6.2.1: facility 0..23, severity 0..7
        raise ValueError("PRI out of range")
    position = header.end()
    elements: dict[str, dict[str, str]] = {}
    if line.startswith("-", position):
        position += 1
    else:
        while line.startswith("[", position):
            position = _parse_element(line, position + 1, elements)
    msg: str | None = None
    if position < len(line):
        if line[position] != " ":
            raise ValueError("garbage after STRUCTURED-DATA")
        msg = line[position + 1 :]
    timestamp, hostname, app_name, procid, msgid = header.group(2, 3, 4, 5, 6)
    return SyslogMessage(pri // 8, pri % 8, timestamp, hostname, app_name, procid, msgid, elements, msg)


def _parse_element(line: str, position: int, elements: dict[str, dict[str, str]]) -> int:
    end = position
    while line[end] not in " ]":
        end += 1
    sd_id = line[position:end]
    params: dict[str, str] = {}
    position = end
    while line[position] == " ":
        equals = line.index("=", position)
        name = line[position + 1 : equals]
        if not name or len(name) > 32 or any(c in name for c in ' ]"'):
            raise ValueError(f"bad PARAM-NAME {name!r}")
        if line[equals + 1] != '"':
            raise ValueError("PARAM-VALUE must be quoted")
        position = equals + 2
        value: list[str] = []
        while line[position] != '"':
            char = line[position]
            if char == "\\" and line[position + 1] in '"\\]':
                value.append(line[position + 1])
                position += 2
                continue
            if char in '"]':
                raise ValueError("unescaped special character in PARAM-VALUE")
            value.append(char)
            position += 1
        params[name] = "".join(value)
        position += 1
    if line[position] != "]":
        raise ValueError("SD-ELEMENT not closed")
    elements[sd_id] = params
    return position + 1
