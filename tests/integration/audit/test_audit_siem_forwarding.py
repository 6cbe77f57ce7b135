"""Forwarding the audit log to a real rsyslog over TLS (RFC 5425), on SQLite and PostgreSQL:
every record arrives once and in leaf order; while the SIEM is down records wait and the
forwarder backs off, then all arrive; a crash after sending re-sends (duplicates by id) but
loses nothing; an untrusted SIEM certificate is refused; the worker tick forwards.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.export import SD_ID, LoggedRecord, Observer, iter_records
from phivault.audit.models import AuditRecord
from phivault.audit.service import Actor, SystemSubject, Target, record
from phivault.audit.siem import (
    ForwardState,
    SiemDestination,
    SiemForwarder,
    TlsSyslogTransport,
    tls_context,
)
from phivault.clock import ManualClock
from phivault.config.settings import Settings, load_settings
from phivault.runtime import Runtime, build_runtime, initialise
from servers.common import unavailable
from servers.rsyslog import RsyslogServer, RsyslogUnavailable, parse_syslog

ALICE = SystemSubject(Actor(ActorType.USER, "user-alice"), institution_id="inst-a")
OBSERVER = Observer("phivault/local/audit", "vault-test")
LEASE = timedelta(seconds=60)


@pytest.fixture
def rsyslog() -> Iterator[RsyslogServer]:
    try:
        server = RsyslogServer()
        server.start()
    except RsyslogUnavailable as exc:
        unavailable(f"rsyslog: {exc}")
        raise  # unreachable: unavailable() skips or fails
    yield server
    server.remove()


def _forwarder(
    runtime: Runtime, server: RsyslogServer, *, batch: int = 7, trusted: bool = True
) -> SiemForwarder:
    destination = SiemDestination.parse(server.url)
    context = tls_context(server.ca_file if trusted else None)
    return SiemForwarder(
        runtime.db,
        runtime.clock,
        destination,
        TlsSyslogTransport(destination, context, timeout=5),
        OBSERVER,
        batch_records=batch,
        budget_seconds=30,
        lease=LEASE,
    )


def _write(runtime: Runtime, count: int) -> None:
    with runtime.db.transaction() as session:
        for i in range(count):
            record(
                session,
                AuditAction.AUDIT_READ,
                ALICE,
                Target("exam", f"e{i}"),
                Outcome.SUCCESS,
                now=runtime.clock.now(),
            )
    while runtime.audit.integrate_pending(runtime.clock.now()):
        pass


def _log(runtime: Runtime) -> list[LoggedRecord]:
    return list(iter_records(runtime.db))


def _received(server: RsyslogServer, count: int) -> list[tuple[int, str]]:
    """(leaf, id) of each message rsyslog wrote, in arrival order (waits for ``count``)."""
    parsed = [parse_syslog(line) for line in server.wait_for_messages(count)]
    return [(int(m.structured_data[SD_ID]["leaf"]), m.structured_data[SD_ID]["id"]) for m in parsed]


def _expected(records: list[LoggedRecord]) -> list[tuple[int, str]]:
    return [(item.leaf_index, item.fields.id) for item in records]


def test_rsyslog_test_server_listens_on_loopback_only(rsyslog: RsyslogServer) -> None:
    assert rsyslog.listening_addresses() == {"127.0.0.1"}


def test_every_record_arrives_once_in_leaf_order(runtime: Runtime, rsyslog: RsyslogServer) -> None:
    _write(runtime, 25)
    forwarder = _forwarder(runtime, rsyslog)
    report = forwarder.forward()
    assert report.state is ForwardState.IDLE
    records = _log(runtime)
    assert report.delivered == len(records) >= 25
    assert _received(rsyslog, len(records)) == _expected(records)
    assert forwarder.status().next_leaf_index == len(records)
    # caught up: nothing more is sent
    assert forwarder.forward().delivered == 0
    assert len(rsyslog.messages()) == len(records)
    message = parse_syslog(rsyslog.messages()[0])
    assert (message.app_name, message.msgid, message.facility) == ("phivault", "audit.read", 10)


def test_siem_down_records_wait_and_all_arrive_after_it_returns(
    runtime: Runtime, rsyslog: RsyslogServer, clock: ManualClock
) -> None:
    forwarder = _forwarder(runtime, rsyslog)
    _write(runtime, 5)
    forwarder.forward()
    delivered_before = len(_log(runtime))
    _received(rsyslog, delivered_before)

    rsyslog.stop()
    _write(runtime, 12)
    assert forwarder.forward().state is ForwardState.FAILED
    status = forwarder.status()
    assert status.next_leaf_index == delivered_before
    assert status.failures == 1
    assert status.retry_at is not None
    assert status.retry_at > clock.now()
    assert status.last_error
    # within the back-off nobody even tries
    assert forwarder.forward().state is ForwardState.BACKING_OFF
    clock.advance(timedelta(seconds=2))
    assert forwarder.forward().state is ForwardState.FAILED
    assert forwarder.status().failures == 2
    with runtime.db.transaction() as session:
        gaps = session.scalar(
            select(func.count()).where(AuditRecord.action == AuditAction.AUDIT_FORWARD_FAIL.value)
        )
    assert gaps == 1  # one audit record per outage, not per attempt

    rsyslog.start()
    clock.advance(timedelta(minutes=10))
    while runtime.audit.integrate_pending(clock.now()):
        pass
    assert forwarder.forward().state is ForwardState.IDLE
    records = _log(runtime)
    assert _received(rsyslog, len(records)) == _expected(records)
    assert forwarder.status().failures == 0
    actions = [item.fields.action for item in records]
    assert AuditAction.AUDIT_FORWARD_FAIL.value in actions  # the gap itself reached the SIEM


def test_crash_between_send_and_cursor_update_resends_but_loses_nothing(
    runtime: Runtime, rsyslog: RsyslogServer, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(runtime, 10)
    crashing = _forwarder(runtime, rsyslog, batch=4)

    def crash(*_args: object) -> None:
        raise SystemExit("process killed after sending, before the cursor commit")

    monkeypatch.setattr(crashing, "_advance", crash)
    with pytest.raises(SystemExit):
        crashing.forward_batch()
    first_batch = _received(rsyslog, 4)
    assert len(first_batch) == 4

    restarted = _forwarder(runtime, rsyslog, batch=4)
    assert restarted.status().next_leaf_index == 0
    # the dead forwarder's lease still holds the cursor: no second forwarder meanwhile
    assert restarted.forward().state is ForwardState.BUSY
    clock.advance(LEASE + timedelta(seconds=1))
    assert restarted.forward().state is ForwardState.IDLE

    records = _log(runtime)
    received = _received(rsyslog, len(records) + 4)
    assert received[:4] == first_batch
    assert received[4:] == _expected(records)  # the re-delivery is complete and in order
    duplicated = {key for key, seen in Counter(received).items() if seen > 1}
    assert duplicated == set(first_batch)  # duplicates are exactly the unconfirmed batch, same ids


def test_untrusted_siem_certificate_is_refused_and_nothing_is_lost(
    runtime: Runtime, rsyslog: RsyslogServer, clock: ManualClock
) -> None:
    _write(runtime, 3)
    untrusting = _forwarder(runtime, rsyslog, trusted=False)
    assert untrusting.forward().state is ForwardState.FAILED
    assert "certificate" in (untrusting.status().last_error or "")
    assert untrusting.status().next_leaf_index == 0
    assert rsyslog.messages() == []
    clock.advance(timedelta(minutes=10))
    trusting = _forwarder(runtime, rsyslog)
    assert trusting.forward().state is ForwardState.IDLE
    records = _log(runtime)
    assert _received(rsyslog, len(records)) == _expected(records)


def _siem_settings(settings: Settings, server: RsyslogServer) -> Settings:
    return load_settings(
        data_dir=settings.data_dir,
        database_url=settings.database_url,
        phi_database_url=settings.phi_database_url,
        siem_url=server.url,
        siem_ca_file=server.ca_file,
        siem_client_cert_file=server.client_cert_file,
        siem_client_key_file=server.client_key_file,
    )


def test_worker_tick_integrates_then_forwards_when_siem_is_configured(
    settings: Settings, rsyslog: RsyslogServer, clock: ManualClock
) -> None:
    runtime = build_runtime(_siem_settings(settings, rsyslog), clock=clock)
    try:
        initialise(runtime)
        assert runtime.siem is not None
        with runtime.db.transaction() as session:
            for i in range(3):
                record(
                    session,
                    AuditAction.AUDIT_READ,
                    ALICE,
                    Target("exam", f"e{i}"),
                    Outcome.SUCCESS,
                    now=clock.now(),
                )
        worker = runtime.new_worker("test")
        assert worker.tick is not None
        worker.tick()
        worker.tick()  # the checkpoint key's own record, created by the first integration
        records = _log(runtime)
        assert len(records) >= 3
        assert _received(rsyslog, len(records)) == _expected(records)
    finally:
        runtime.close()


def test_siem_requiring_client_certificates_accepts_only_a_forwarder_presenting_one(
    runtime: Runtime, clock: ManualClock
) -> None:
    try:
        server = RsyslogServer(require_client_cert=True)
        server.start()
    except RsyslogUnavailable as exc:
        unavailable(f"rsyslog: {exc}")
        raise
    try:
        _write(runtime, 3)
        destination = SiemDestination.parse(server.url)
        anonymous = _forwarder(runtime, server)
        assert anonymous.forward().state is ForwardState.FAILED
        assert anonymous.status().next_leaf_index == 0
        clock.advance(timedelta(minutes=10))
        context = tls_context(server.ca_file, server.client_cert_file, server.client_key_file)
        mutual = SiemForwarder(
            runtime.db,
            clock,
            destination,
            TlsSyslogTransport(destination, context, timeout=5),
            OBSERVER,
        )
        assert mutual.forward().state is ForwardState.IDLE
        records = _log(runtime)
        assert _received(server, len(records)) == _expected(records)
    finally:
        server.remove()


def test_silent_siem_costs_one_timeout_then_backs_off_while_the_sequencer_keeps_going(
    settings: Settings, clock: ManualClock
) -> None:
    # A real listener that accepts TCP but never answers the TLS handshake: a hung SIEM.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        hung = load_settings(
            data_dir=settings.data_dir,
            database_url=settings.database_url,
            phi_database_url=settings.phi_database_url,
            siem_url=f"syslog+tls://127.0.0.1:{port}",
            siem_timeout_seconds=0.5,
        )
        runtime = build_runtime(hung, clock=clock)
        try:
            initialise(runtime)
            assert runtime.siem is not None
            tick = runtime.new_worker("test").tick
            assert tick is not None
            _write_pending(runtime, 3)
            started = time.monotonic()
            tick()
            assert time.monotonic() - started < 3
            assert runtime.audit.tree_size() >= 3  # integrated despite the hung SIEM
            assert runtime.siem.status().failures == 1
            assert runtime.siem.status().last_error == "timed out"

            _write_pending(runtime, 2)
            started = time.monotonic()
            tick()  # within the back-off: no connection attempt at all
            assert time.monotonic() - started < 0.4
            assert runtime.audit.tree_size() >= 5
            assert runtime.siem.status().next_leaf_index == 0
        finally:
            runtime.close()


def _write_pending(runtime: Runtime, count: int) -> None:
    with runtime.db.transaction() as session:
        for i in range(count):
            record(
                session,
                AuditAction.AUDIT_READ,
                ALICE,
                Target("exam", f"p{i}"),
                Outcome.SUCCESS,
                now=runtime.clock.now(),
            )
