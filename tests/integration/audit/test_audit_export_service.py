"""Exporting the audit log from a real database (SQLite and PostgreSQL): leaf order, only
integrated records, filters, batching, inclusion proofs from exported lines, a valid FHIR
Bundle, parseable syslog, and the export itself audited.
"""

from __future__ import annotations

import json
from datetime import timedelta

from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import select

from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.canonical import canonical_bytes
from phivault.audit.export import (
    SD_ID,
    ExportFilter,
    ExportFormat,
    Observer,
    export_log,
    iter_records,
    parse_jsonl_line,
)
from phivault.audit.merkle import leaf_hash, verify_inclusion
from phivault.audit.models import AuditRecord
from phivault.audit.service import Actor, RequestContext, SystemSubject, Target, record
from phivault.clock import ManualClock
from phivault.runtime import Runtime
from servers.rsyslog import parse_syslog

ALICE = SystemSubject(Actor(ActorType.USER, "user-alice"), institution_id="inst-a")
BOB = SystemSubject(Actor(ActorType.USER, "user-bob"), institution_id="inst-b")
OPERATOR = SystemSubject(Actor(ActorType.USER, "operator-1"))
CLI = SystemSubject(Actor.system("test-cli"))
OBSERVER = Observer("phivault/local/audit", "vault-test")


def _write(runtime: Runtime, subject: SystemSubject, count: int, action: AuditAction) -> list[str]:
    with runtime.db.transaction() as session:
        return [
            record(
                session,
                action,
                subject,
                Target("exam", f"exam-{i}"),
                Outcome.SUCCESS,
                now=runtime.clock.now(),
                context=RequestContext(ip="192.0.2.1", request_id=f"req-{i}"),
            )
            for i in range(count)
        ]


def _integrate(runtime: Runtime) -> None:
    while runtime.audit.integrate_pending(runtime.clock.now()):
        pass


# The first integration also creates the checkpoint key, which is itself audited: filter on
# the writer to see only a test's own records.
ALICE_ONLY = ExportFilter(actor_id="user-alice")


def _export(
    runtime: Runtime, fmt: ExportFormat, filters: ExportFilter | None = None, batch: int = 3
) -> bytes:
    chunks = export_log(
        runtime.db,
        fmt,
        filters or ExportFilter(),
        CLI,
        OBSERVER,
        now=runtime.clock.now(),
        batch_size=batch,
    )
    return b"".join(chunks)


def test_jsonl_export_is_leaf_ordered_and_lines_prove_inclusion(runtime: Runtime) -> None:
    written = _write(runtime, ALICE, 7, AuditAction.AUDIT_READ)
    _integrate(runtime)
    size = runtime.audit.tree_size()
    everything = [parse_jsonl_line(line) for line in _export(runtime, ExportFormat.JSONL).splitlines()]
    assert [item.leaf_index for item in everything] == list(range(size))
    exported = [
        parse_jsonl_line(line) for line in _export(runtime, ExportFormat.JSONL, ALICE_ONLY).splitlines()
    ]
    assert [item.fields.id for item in exported] == written
    for item in exported:
        leaf, _ = runtime.audit.inclusion(item.leaf_index, size)
        assert leaf_hash(canonical_bytes(item.fields)) == leaf
    checkpoint = runtime.audit.checkpoint_now(runtime.clock.now())
    assert checkpoint is not None
    for item in exported:
        _, proof = runtime.audit.inclusion(item.leaf_index, checkpoint.size)
        # raises ProofError unless the exported line is in the signed tree
        verify_inclusion(
            leaf_hash(canonical_bytes(item.fields)),
            item.leaf_index,
            checkpoint.size,
            proof,
            checkpoint.root_hash,
        )


def test_records_not_yet_integrated_are_not_exported(runtime: Runtime) -> None:
    _write(runtime, ALICE, 2, AuditAction.AUDIT_READ)
    _integrate(runtime)
    _write(runtime, ALICE, 3, AuditAction.AUDIT_READ)
    assert len(_export(runtime, ExportFormat.JSONL, ALICE_ONLY).splitlines()) == 2


def test_every_export_is_itself_audited_under_the_exported_institution(runtime: Runtime) -> None:
    _write(runtime, ALICE, 1, AuditAction.AUDIT_READ)
    _integrate(runtime)
    _export(runtime, ExportFormat.FHIR, ExportFilter(institution_id="inst-a"))
    with runtime.db.transaction() as session:
        exports = session.scalars(
            select(AuditRecord).where(AuditRecord.action == AuditAction.AUDIT_EXPORT.value)
        ).all()
    assert len(exports) == 1
    assert exports[0].institution_id == "inst-a"
    assert exports[0].actor_id == "test-cli"
    assert (exports[0].object_type, exports[0].object_id) == ("audit_export", "fhir")


def test_filters_select_institution_platform_action_actor_and_time(
    runtime: Runtime, clock: ManualClock
) -> None:
    start = clock.now()
    alice = _write(runtime, ALICE, 2, AuditAction.AUDIT_READ)
    clock.advance(timedelta(hours=1))
    bob = _write(runtime, BOB, 2, AuditAction.AUDIT_VERIFY)
    clock.advance(timedelta(hours=1))
    operator = _write(runtime, OPERATOR, 1, AuditAction.KEY_ROTATE)
    _integrate(runtime)

    def ids(filters: ExportFilter) -> list[str]:
        return [item.fields.id for item in iter_records(runtime.db, filters, batch_size=2)]

    assert ids(ExportFilter(institution_id="inst-a")) == alice
    platform = ids(ExportFilter(platform_only=True))
    assert [item for item in platform if item in operator] == operator
    assert not set(platform) & set(alice + bob)
    assert ids(ExportFilter(action=AuditAction.AUDIT_VERIFY.value)) == bob
    assert ids(ExportFilter(actor_id="user-bob")) == bob
    assert ids(ExportFilter(since=start + timedelta(hours=1), actor_id="user-bob")) == bob
    assert ids(ExportFilter(until=start + timedelta(hours=1))) == alice
    assert ids(ExportFilter(since=start + timedelta(minutes=30), until=start + timedelta(minutes=90))) == bob
    assert ids(ExportFilter(institution_id="inst-none")) == []


def test_export_reads_in_batches_across_filtered_gaps(runtime: Runtime) -> None:
    expected: list[str] = []
    for _ in range(4):
        expected += _write(runtime, ALICE, 3, AuditAction.AUDIT_READ)
        _write(runtime, BOB, 4, AuditAction.AUDIT_READ)
    _integrate(runtime)
    found = [
        item.fields.id
        for item in iter_records(runtime.db, ExportFilter(institution_id="inst-a"), batch_size=2)
    ]
    assert found == expected


def test_fhir_export_is_a_valid_bundle_with_one_audit_event_per_record(runtime: Runtime) -> None:
    written = _write(runtime, ALICE, 5, AuditAction.AUDIT_READ)
    _integrate(runtime)
    document = _export(runtime, ExportFormat.FHIR, ALICE_ONLY)
    bundle = Bundle.model_validate_json(document)
    assert bundle.type == "collection"
    assert bundle.entry is not None
    assert [entry.resource.id for entry in bundle.entry if entry.resource] == written
    assert all(type(entry.resource).__name__ == "AuditEvent" for entry in bundle.entry)
    assert json.loads(document)["id"]  # the export record's id names the Bundle


def test_syslog_export_is_one_rfc5424_message_per_line(runtime: Runtime) -> None:
    written = _write(runtime, ALICE, 4, AuditAction.AUDIT_READ)
    _integrate(runtime)
    lines = _export(runtime, ExportFormat.SYSLOG, ALICE_ONLY).decode().splitlines()
    parsed = [parse_syslog(line) for line in lines]
    assert [message.structured_data[SD_ID]["id"] for message in parsed] == written
    leaves = [int(message.structured_data[SD_ID]["leaf"]) for message in parsed]
    assert leaves == sorted(leaves)
    assert {message.msgid for message in parsed} == {"audit.read"}
