"""The three export encodings of a record, without a database: JSON Lines (lossless, re-hashes
to the leaf), FHIR R4 ``AuditEvent`` (validated by ``fhir.resources``), RFC 5424 syslog
(parsed back strictly, escapes included), and the RFC 5425 framing and SIEM URL.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from phivault.audit.actions import AuditAction
from phivault.audit.canonical import RecordFields, canonical_bytes
from phivault.audit.export import (
    ACTION_SYSTEM,
    SD_ID,
    ExportFormatError,
    Facility,
    LoggedRecord,
    Observer,
    audit_event,
    fhir_bundle_stream,
    jsonl_line,
    parse_jsonl_line,
    sd_escape,
    syslog_message,
)
from phivault.audit.siem import SiemConfigError, SiemDestination, octet_counted
from servers.rsyslog import parse_syslog

OBSERVER = Observer("phivault/local/audit", "vault-1.example")
MOMENT = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)


def _record(
    *,
    action: str = "audit.export",
    outcome: str = "success",
    user_agent: str | None = "curl/8.5",
    institution_id: str | None = "3f1c2a9e-8d7b-4c6a-9e5f-1a2b3c4d5e6f",
    object_type: str | None = "exam",
    request_id: str | None = "req-1",
    ip: str | None = "192.0.2.7",
) -> LoggedRecord:
    return LoggedRecord(
        41,
        RecordFields(
            id="0b7e5c1a-3d2f-4e6a-8b9c-0d1e2f3a4b5c",
            ts=MOMENT,
            actor_type="user",
            actor_id="user-7",
            institution_id=institution_id,
            action=action,
            object_type=object_type,
            object_id=None if object_type is None else "exam-9",
            outcome=outcome,
            ip=ip,
            user_agent=user_agent,
            request_id=request_id,
        ),
    )


def test_jsonl_line_is_the_canonical_record_plus_leaf_index_and_round_trips() -> None:
    item = _record(user_agent='ua ü "quoted" \\ ]')
    line = jsonl_line(item)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    document = json.loads(line)
    assert document["leaf_index"] == 41
    del document["leaf_index"]
    assert json.loads(canonical_bytes(item.fields)) == document
    back = parse_jsonl_line(line)
    assert back == item
    assert canonical_bytes(back.fields) == canonical_bytes(item.fields)


@pytest.mark.parametrize("line", [b"", b"{}", b"[1]", b'{"v":"9"}', b"not json"])
def test_malformed_jsonl_line_raises_one_error_type(line: bytes) -> None:
    with pytest.raises(ExportFormatError):
        parse_jsonl_line(line)


@pytest.mark.parametrize(("outcome", "fhir_outcome"), [("success", "0"), ("denied", "4"), ("failure", "8")])
def test_audit_event_is_valid_r4_with_outcome_code(outcome: str, fhir_outcome: str) -> None:
    event = AuditEvent.model_validate(audit_event(_record(outcome=outcome), OBSERVER))
    assert event.outcome == fhir_outcome
    assert event.id == "0b7e5c1a-3d2f-4e6a-8b9c-0d1e2f3a4b5c"
    assert event.subtype is not None
    assert (event.subtype[0].system, event.subtype[0].code) == (ACTION_SYSTEM, "audit.export")
    assert event.type.code == "110106"  # DICOM "Export"
    assert event.action == "R"
    assert event.agent[0].who is not None
    assert event.agent[0].who.identifier is not None
    assert event.agent[0].who.identifier.value == "user-7"
    assert event.agent[0].network is not None
    assert event.agent[0].network.address == "192.0.2.7"
    assert event.source.observer.identifier is not None
    assert event.source.observer.identifier.value == "phivault/local/audit"
    assert event.entity is not None
    assert [entity.type.code for entity in event.entity if entity.type] == ["2", "3"]


def test_audit_event_without_object_institution_or_address_is_still_valid() -> None:
    item = _record(
        action=AuditAction.KEY_SHRED, institution_id=None, object_type=None, request_id=None, ip=None
    )
    event = AuditEvent.model_validate(audit_event(item, OBSERVER))
    assert event.entity is None
    assert event.agent[0].network is None
    assert event.action == "D"
    assert event.type.code == "110113"  # DICOM "Security Alert"


def test_api_request_maps_to_rest_event_type() -> None:
    event = AuditEvent.model_validate(audit_event(_record(action="exam.comment"), OBSERVER))
    assert (event.type.system, event.type.code) == (
        "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "rest",
    )
    assert event.action == "E"


def test_streamed_bundle_is_a_valid_collection_of_audit_events() -> None:
    items = [_record(), _record(outcome="denied", institution_id=None)]
    document = b"".join(fhir_bundle_stream(items, OBSERVER, now=MOMENT, bundle_id="export-1"))
    bundle = Bundle.model_validate_json(document)
    assert bundle.type == "collection"
    assert bundle.entry is not None
    assert len(bundle.entry) == 2
    assert all(type(entry.resource).__name__ == "AuditEvent" for entry in bundle.entry)


def test_empty_bundle_is_valid_json_and_a_valid_bundle() -> None:
    document = b"".join(fhir_bundle_stream([], OBSERVER, now=MOMENT, bundle_id="export-2"))
    assert json.loads(document)["entry"] == []
    assert Bundle.model_validate_json(document).type == "collection"


def test_syslog_message_parses_back_as_rfc5424_with_every_field() -> None:
    line = syslog_message(_record(outcome="denied"), OBSERVER).decode()
    parsed = parse_syslog(line)
    assert (parsed.facility, parsed.severity) == (Facility.AUTHPRIV, 4)  # authpriv.warning
    assert line.startswith("<84>1 2026-03-04T05:06:07.890123Z vault-1.example phivault - audit.export [")
    assert parsed.msgid == "audit.export"
    assert parsed.msg is None
    params = parsed.structured_data[SD_ID]
    assert params["id"] == "0b7e5c1a-3d2f-4e6a-8b9c-0d1e2f3a4b5c"
    assert params["leaf"] == "41"
    assert params["actor"] == "user-7"
    assert params["object"] == "exam-9"
    assert params["outcome"] == "denied"
    assert params["log"] == "phivault/local/audit"


def test_syslog_omits_absent_fields_and_uses_local0_when_asked() -> None:
    item = _record(institution_id=None, object_type=None, user_agent=None, request_id=None, ip=None)
    parsed = parse_syslog(syslog_message(item, OBSERVER, facility=Facility.LOCAL0).decode())
    assert (parsed.facility, parsed.severity) == (16, 6)  # local0.info
    assert set(parsed.structured_data[SD_ID]) == {"id", "leaf", "log", "actor_type", "actor", "outcome"}


def test_sd_param_values_escape_quote_backslash_and_bracket_per_rfc5424_6_3_3() -> None:
    assert sd_escape('a"b\\c]d') == 'a\\"b\\\\c\\]d'
    nasty = 'x" injected="1"] [evil@1 a="b\\'
    parsed = parse_syslog(syslog_message(_record(user_agent=nasty), OBSERVER).decode())
    assert parsed.structured_data[SD_ID]["ua"] == nasty
    assert set(parsed.structured_data) == {SD_ID}


def test_control_characters_cannot_split_a_syslog_line() -> None:
    line = syslog_message(_record(user_agent="a\nb\rc\x00d"), OBSERVER)
    assert b"\n" not in line
    assert b"\r" not in line
    assert parse_syslog(line.decode()).structured_data[SD_ID]["ua"] == "a\ufffdb\ufffdc\ufffdd"


def test_header_fields_are_printable_ascii_within_rfc5424_limits() -> None:
    observer = Observer("phivault/local/audit", "host with spaces ü")
    parsed = parse_syslog(syslog_message(_record(action="x." + "y" * 60), observer).decode())
    assert parsed.hostname == "host_with_spaces__"
    assert len(parsed.msgid) == 32


def test_octet_counting_frames_by_byte_length_per_rfc5425_4_3() -> None:
    assert octet_counted([b"abc", "ü".encode()]) == b"3 abc2 \xc3\xbc"


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("syslog+tls://siem.example", "siem.example:6514"),
        ("syslog+tls://127.0.0.1:10514", "127.0.0.1:10514"),
        ("syslog+tls://[::1]:6514", "[::1]:6514"),
    ],
)
def test_siem_url_parses_with_default_port_6514(url: str, name: str) -> None:
    assert SiemDestination.parse(url).name == name


@pytest.mark.parametrize(
    "url",
    [
        "syslog://siem.example",
        "https://siem.example",
        "syslog+tls://",
        "syslog+tls://h:99999",
        "syslog+tls://h/x",
    ],
)
def test_bad_siem_url_is_refused(url: str) -> None:
    with pytest.raises(SiemConfigError):
        SiemDestination.parse(url)
