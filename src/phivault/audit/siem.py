"""Forward the audit log to a SIEM: RFC 5424 syslog over TLS (RFC 5425), in leaf order.

Delivery is **at least once**. A cursor row per destination (``audit_forward_cursors``)
holds the first leaf index not yet confirmed; one forwarding step

1. claims the cursor with a lease and reads the next batch of integrated records (one short
   transaction; no database lock is held while the network is used, so a slow SIEM never
   stalls SQLite writers or the audit sequencer);
2. opens a TLS connection, writes the batch with octet-counting framing (RFC 5425 §4.3),
   then closes the connection with ``close_notify`` (§4.4) and waits for the SIEM to close
   its side, which it does only after reading everything before our ``close_notify``;
3. only then advances the cursor, conditioned on still holding the lease.

A crash or a lost connection between 2 and 3 leaves the cursor where it was: the batch is
sent again, so a SIEM may see a record twice, never zero times. Duplicates carry the same
record ``id`` (and ``leaf``), by which the SIEM can drop them. While the SIEM is down the
cursor stays put and a back-off (``retry_at``, shared by every replica) spaces out the
attempts; records simply wait in the log, which is durable, so nothing is lost.

The lease makes one replica forward at a time: another replica finding the cursor leased
skips its turn. A forwarder that outlives its lease cannot advance the cursor.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.errors import AuditError
from phivault.audit.export import Facility, LoggedRecord, Observer, read_batch, syslog_message
from phivault.audit.models import AuditForwardCursor
from phivault.audit.service import Actor, SystemSubject, Target, record
from phivault.clock import Clock
from phivault.db.engine import Database
from phivault.ids import new_token

log = logging.getLogger(__name__)

SCHEME = "syslog+tls"
DEFAULT_PORT = 6514  # RFC 5425 §4.1: the IANA port of syslog over TLS
MAX_BACKOFF = timedelta(minutes=5)
_ERROR_LIMIT = 200
FORWARDER_ACTOR = Actor.system("audit-forwarder")


class SiemConfigError(AuditError):
    """The SIEM URL or TLS material cannot be used."""

    default_message = "the SIEM destination is not valid"


class SiemUnavailable(AuditError):
    """The SIEM could not be reached, refused TLS, or did not confirm the batch."""

    default_message = "the SIEM did not accept the batch"


@dataclass(frozen=True, slots=True)
class SiemDestination:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> SiemDestination:
        """``syslog+tls://host[:port]``; the port defaults to 6514."""
        parts = urlsplit(url)
        if parts.scheme != SCHEME or not parts.hostname:
            raise SiemConfigError(f"expected {SCHEME}://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise SiemConfigError(f"expected {SCHEME}://host[:port] with nothing after the port")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise SiemConfigError("the port is not a number between 1 and 65535") from None
        return cls(parts.hostname, port)

    @property
    def name(self) -> str:
        """The cursor's key: a new destination starts from the beginning of the log."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def tls_context(
    ca_file: Path | None, client_cert_file: Path | None = None, client_key_file: Path | None = None
) -> ssl.SSLContext:
    """Client TLS as RFC 5425 §5 wants it: the server's certificate and name verified
    (against ``ca_file``, else the system's CAs), TLS 1.2 or newer, optional client cert.
    """
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if client_cert_file is not None and client_key_file is not None:
            context.load_cert_chain(str(client_cert_file), str(client_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise SiemConfigError(f"cannot load the SIEM TLS material: {type(exc).__name__}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class SyslogTransport(Protocol):
    def deliver(self, messages: Sequence[bytes]) -> None:
        """Send ``messages`` and return only once the receiver confirmed reading them all."""
        ...


def octet_counted(messages: Sequence[bytes]) -> bytes:
    """RFC 5425 §4.3 framing: ``MSG-LEN SP SYSLOG-MSG`` per message, MSG-LEN in octets."""
    return b"".join(b"%d %s" % (len(message), message) for message in messages)


# A receiver that refuses the session after the handshake (rsyslog checking a client
# certificate: "peer did not provide a certificate") closes it at once, measured < 1 ms with
# rsyslog 8.2302. Without waiting to see that, a refused batch would look delivered: TLS 1.2
# lets the client finish its handshake and write before the server's verdict arrives.
REFUSAL_WAIT_SECONDS = 0.2


class TlsSyslogTransport:
    """One TLS connection per batch; the graceful close is the receipt (see module doc)."""

    def __init__(
        self,
        destination: SiemDestination,
        context: ssl.SSLContext,
        *,
        timeout: float,
        refusal_wait: float = REFUSAL_WAIT_SECONDS,
    ) -> None:
        self.destination = destination
        self.context = context
        self.timeout = timeout
        self.refusal_wait = refusal_wait

    def deliver(self, messages: Sequence[bytes]) -> None:
        host, port = self.destination.host, self.destination.port
        try:
            with (
                socket.create_connection((host, port), timeout=self.timeout) as raw,
                self.context.wrap_socket(raw, server_hostname=host) as tls,
            ):
                self._check_not_refused(tls)
                tls.sendall(octet_counted(messages))
                # unwrap() sends close_notify (RFC 5425 §4.4) and reads until the peer closes.
                # rsyslog (8.2302, GnuTLS) answers by closing TCP without its own
                # close_notify: an EOF after our close_notify is the same receipt. A peer
                # that dies with unread data resets the connection instead, which fails here.
                with contextlib.suppress(ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    tls.unwrap()
        except ssl.SSLCertVerificationError as exc:
            raise SiemUnavailable(f"TLS certificate not accepted: {exc.verify_message}") from None
        except (OSError, ssl.SSLError) as exc:
            raise SiemUnavailable(_describe(exc)) from None

    def _check_not_refused(self, tls: ssl.SSLSocket) -> None:
        """A syslog receiver never writes (RFC 5425 §4.3): anything but silence is a refusal."""
        tls.settimeout(self.refusal_wait)
        try:
            tls.recv(1)
        except TimeoutError:
            tls.settimeout(self.timeout)
            return
        raise SiemUnavailable("the SIEM closed the session after the TLS handshake (client certificate?)")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


class ForwardState(StrEnum):
    DELIVERED = "delivered"  # a batch was delivered and the cursor advanced
    IDLE = "idle"  # nothing to send
    BACKING_OFF = "backing_off"  # the SIEM failed recently; not yet time to retry
    BUSY = "busy"  # another forwarder holds the cursor
    FAILED = "failed"  # this attempt failed; retry_at set
    LEASE_LOST = "lease_lost"  # sent, but another forwarder took the cursor over meanwhile


@dataclass(frozen=True, slots=True)
class ForwardReport:
    state: ForwardState
    delivered: int
    next_leaf_index: int


@dataclass(frozen=True, slots=True)
class CursorStatus:
    destination: str
    next_leaf_index: int
    failures: int
    retry_at: datetime | None
    last_error: str | None
    last_delivered_at: datetime | None


@dataclass(frozen=True, slots=True)
class _Claim:
    token: str
    start: int
    records: list[LoggedRecord]


class SiemForwarder:
    """Delivers integrated audit records to one SIEM destination, in leaf order."""

    def __init__(  # noqa: PLR0913  # the tuning knobs are settings, named at the call site
        self,
        db: Database,
        clock: Clock,
        destination: SiemDestination,
        transport: SyslogTransport,
        observer: Observer,
        *,
        batch_records: int = 2000,
        budget_seconds: float = 2.0,
        lease: timedelta = timedelta(seconds=60),
        facility: Facility = Facility.AUTHPRIV,
    ) -> None:
        self.db = db
        self.clock = clock
        self.destination = destination
        self.transport = transport
        self.observer = observer
        self.batch_records = batch_records
        self.budget_seconds = budget_seconds
        self.lease = lease
        self.facility = facility

    def forward(self) -> ForwardReport:
        """Deliver batches until caught up, failing, or the time budget is spent.

        The budget (wall time) bounds how long the worker's housekeeping tick is held up.
        """
        deadline = time.monotonic() + self.budget_seconds
        delivered = 0
        while True:
            step = self.forward_batch()
            delivered += step.delivered
            if step.state is not ForwardState.DELIVERED or time.monotonic() >= deadline:
                return ForwardReport(step.state, delivered, step.next_leaf_index)

    def forward_batch(self) -> ForwardReport:
        """One claim → send → advance step (module doc)."""
        now = self.clock.now()
        claim, report = self._claim(now)
        if claim is None:
            return report
        messages = [syslog_message(item, self.observer, facility=self.facility) for item in claim.records]
        try:
            self.transport.deliver(messages)
        except SiemUnavailable as exc:
            return self._fail(claim, str(exc))
        return self._advance(claim)

    def status(self) -> CursorStatus:
        with self.db.transaction() as session:
            row = session.get(AuditForwardCursor, self.destination.name)
            if row is None:
                return CursorStatus(self.destination.name, 0, 0, None, None, None)
            return CursorStatus(
                row.destination,
                row.next_leaf_index,
                row.failures,
                row.retry_at,
                row.last_error,
                row.last_delivered_at,
            )

    # -- steps ---------------------------------------------------------------------------

    def _cursor(self, session: Session, now: datetime) -> AuditForwardCursor:
        row = session.get(AuditForwardCursor, self.destination.name, with_for_update=True)
        if row is not None:
            return row
        row = AuditForwardCursor(
            destination=self.destination.name, next_leaf_index=0, failures=0, updated_at=now
        )
        session.add(row)
        try:
            with session.begin_nested():
                session.flush()
        except IntegrityError:
            # Another replica created it first; take theirs (and its lock).
            session.expunge(row)
            existing = session.get(AuditForwardCursor, self.destination.name, with_for_update=True)
            if existing is None:
                raise
            return existing
        return row

    def _claim(self, now: datetime) -> tuple[_Claim | None, ForwardReport]:
        with self.db.transaction() as session:
            cursor = self._cursor(session, now)
            position = cursor.next_leaf_index
            if cursor.lease_token is not None and cursor.lease_expires_at and cursor.lease_expires_at > now:
                return None, ForwardReport(ForwardState.BUSY, 0, position)
            if cursor.retry_at is not None and cursor.retry_at > now:
                return None, ForwardReport(ForwardState.BACKING_OFF, 0, position)
            records = read_batch(session, position, self.batch_records)
            if not records:
                return None, ForwardReport(ForwardState.IDLE, 0, position)
            token = new_token()
            cursor.lease_token = token
            cursor.lease_expires_at = now + self.lease
            cursor.updated_at = now
            return _Claim(token, position, records), ForwardReport(ForwardState.BUSY, 0, position)

    def _advance(self, claim: _Claim) -> ForwardReport:
        now = self.clock.now()
        after = claim.records[-1].leaf_index + 1
        with self.db.transaction() as session:
            changed = session.execute(
                update(AuditForwardCursor)
                .where(
                    AuditForwardCursor.destination == self.destination.name,
                    AuditForwardCursor.lease_token == claim.token,
                    AuditForwardCursor.next_leaf_index == claim.start,
                )
                .values(
                    next_leaf_index=after,
                    failures=0,
                    retry_at=None,
                    last_error=None,
                    last_delivered_at=now,
                    lease_token=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if changed.rowcount != 1:  # type: ignore[attr-defined]
                log.warning("SIEM %s: lease lost; the batch may be delivered twice", self.destination.name)
                return ForwardReport(ForwardState.LEASE_LOST, 0, claim.start)
        return ForwardReport(ForwardState.DELIVERED, len(claim.records), after)

    def _fail(self, claim: _Claim, error: str) -> ForwardReport:
        now = self.clock.now()
        error = error[:_ERROR_LIMIT]
        with self.db.transaction() as session:
            cursor = session.get(AuditForwardCursor, self.destination.name, with_for_update=True)
            if cursor is None or cursor.lease_token != claim.token:
                return ForwardReport(ForwardState.LEASE_LOST, 0, claim.start)
            cursor.failures += 1
            backoff = min(timedelta(seconds=2 ** min(cursor.failures - 1, 16)), MAX_BACKOFF)
            cursor.retry_at = now + backoff
            cursor.last_error = error
            cursor.lease_token = None
            cursor.lease_expires_at = None
            cursor.updated_at = now
            if cursor.failures == 1:
                # Once per outage, not per attempt: a SIEM gap is a security event, but a
                # record per retry would flood the log it is trying to deliver.
                record(
                    session,
                    AuditAction.AUDIT_FORWARD_FAIL,
                    SystemSubject(FORWARDER_ACTOR),
                    Target("siem", self.destination.name[:128]),
                    Outcome.FAILURE,
                    now=now,
                )
            log.warning(
                "SIEM %s unavailable (%s); attempt %d, retrying after %s",
                self.destination.name,
                error,
                cursor.failures,
                cursor.retry_at.isoformat(),
            )
            return ForwardReport(ForwardState.FAILED, 0, claim.start)
