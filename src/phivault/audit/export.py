"""Export the audit log: JSON Lines, a FHIR R4 ``Bundle`` of ``AuditEvent``, RFC 5424 syslog.

Only records already integrated into the Merkle tree are exported, in leaf order, so every
exported record carries its ``leaf_index`` and can be checked with an inclusion proof
(``/api/v1/audit/proofs/inclusion``). Records are read in batches by leaf index (keyset
pagination), each batch in its own short transaction, up to the tree size seen when the
export started: an export is a fixed prefix of the log and never holds the whole log in
memory. Encoders yield bytes chunk by chunk, so the FHIR Bundle is streamed too.

Every export is itself audited (``AuditAction.AUDIT_EXPORT``), committed before the first
byte leaves. Records hold ids only, never PHI (DESIGN.md §6), and so does every format here.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from enum import IntEnum, StrEnum

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.canonical import CANONICAL_VERSION, RecordFields, canonical_bytes, format_ts
from phivault.audit.errors import AuditError
from phivault.audit.models import AuditLeaf, AuditRecord, AuditTreeHead
from phivault.audit.service import (
    HEAD_ID,
    NO_CONTEXT,
    RECORD_COLUMNS,
    RequestContext,
    Subject,
    Target,
    record,
)
from phivault.db.engine import Database

EXPORT_BATCH = 1000


class ExportFormat(StrEnum):
    JSONL = "jsonl"
    FHIR = "fhir"
    SYSLOG = "syslog"


MEDIA_TYPES: dict[ExportFormat, str] = {
    ExportFormat.JSONL: "application/jsonl",
    ExportFormat.FHIR: "application/fhir+json",
    ExportFormat.SYSLOG: "text/plain; charset=utf-8",
}


class ExportFormatError(AuditError):
    """An exported line or document does not have the layout this module writes."""

    default_message = "not a phivault audit export line"


@dataclass(frozen=True, slots=True)
class ExportFilter:
    """Which records to export. ``since`` is inclusive, ``until`` exclusive.

    ``institution_id`` keeps one institution's records; ``platform_only`` keeps the records
    outside any institution (an operator's view). Both unset: the whole log.
    """

    institution_id: str | None = None
    platform_only: bool = False
    since: datetime | None = None
    until: datetime | None = None
    action: str | None = None
    actor_id: str | None = None
    object_type: str | None = None
    object_id: str | None = None
    outcome: str | None = None


EVERYTHING = ExportFilter()


def scoped(subject: Subject, filters: ExportFilter) -> ExportFilter:
    """Confine ``filters`` to what ``subject`` may export: its own institution's records, or,
    for a principal outside any institution (a platform operator), the platform's own records
    (``institution_id IS NULL``) and never a tenant's.
    """
    if subject.institution_id is None:
        return replace(filters, institution_id=None, platform_only=True)
    return replace(filters, institution_id=subject.institution_id, platform_only=False)


@dataclass(frozen=True, slots=True)
class LoggedRecord:
    """A record and its position in the Merkle tree."""

    leaf_index: int
    fields: RecordFields


@dataclass(frozen=True, slots=True)
class Observer:
    """The deployment that wrote the log: its log name (checkpoint origin) and host name."""

    log_name: str
    hostname: str

    @classmethod
    def local(cls, log_name: str) -> Observer:
        return cls(log_name, socket.gethostname() or "-")


# -- reading ------------------------------------------------------------------------------


def conditions(filters: ExportFilter) -> list[ColumnElement[bool]]:
    """The WHERE clauses of ``filters`` (shared with the review of the log)."""
    return _conditions(filters)


def _conditions(filters: ExportFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if filters.platform_only:
        conditions.append(AuditRecord.institution_id.is_(None))
    elif filters.institution_id is not None:
        conditions.append(AuditRecord.institution_id == filters.institution_id)
    if filters.since is not None:
        conditions.append(AuditRecord.ts >= filters.since)
    if filters.until is not None:
        conditions.append(AuditRecord.ts < filters.until)
    if filters.action is not None:
        conditions.append(AuditRecord.action == filters.action)
    if filters.actor_id is not None:
        conditions.append(AuditRecord.actor_id == filters.actor_id)
    if filters.object_type is not None:
        conditions.append(AuditRecord.object_type == filters.object_type)
    if filters.object_id is not None:
        conditions.append(AuditRecord.object_id == filters.object_id)
    if filters.outcome is not None:
        conditions.append(AuditRecord.outcome == filters.outcome)
    return conditions


def read_batch(
    session: Session, start: int, limit: int, *, stop: int | None = None, filters: ExportFilter = EVERYTHING
) -> list[LoggedRecord]:
    """Up to ``limit`` integrated records with leaf index in [start, stop), in leaf order."""
    query = (
        select(AuditLeaf.leaf_index, *RECORD_COLUMNS)
        .join(AuditRecord, AuditRecord.seq == AuditLeaf.record_seq)
        .where(AuditLeaf.leaf_index >= start)
    )
    if stop is not None:
        query = query.where(AuditLeaf.leaf_index < stop)
    query = query.where(*_conditions(filters)).order_by(AuditLeaf.leaf_index).limit(limit)
    return [LoggedRecord(row[0], RecordFields._make(row[1:])) for row in session.execute(query)]


def tree_size(session: Session) -> int:
    head = session.get(AuditTreeHead, HEAD_ID)
    return head.size if head else 0


def iter_records(
    db: Database,
    filters: ExportFilter = EVERYTHING,
    *,
    batch_size: int = EXPORT_BATCH,
    stop: int | None = None,
) -> Iterator[LoggedRecord]:
    """The integrated records matching ``filters``, in leaf order, up to ``stop`` leaves
    (default: the tree size when the first record is asked for).
    """
    if stop is None:
        with db.transaction() as session:
            stop = tree_size(session)
    start = 0
    while start < stop:
        with db.transaction() as session:
            batch = read_batch(session, start, batch_size, stop=stop, filters=filters)
        yield from batch
        if len(batch) < batch_size:
            return
        start = batch[-1].leaf_index + 1


# -- JSON Lines ---------------------------------------------------------------------------

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def jsonl_line(item: LoggedRecord) -> bytes:
    """The record's canonical JSON (what the tree hashes) with ``leaf_index`` added."""
    document = json.loads(canonical_bytes(item.fields))
    document["leaf_index"] = item.leaf_index
    return _dumps(dict(sorted(document.items()))).encode() + b"\n"


def parse_jsonl_line(line: bytes | str) -> LoggedRecord:
    """Read back a line of ``jsonl_line``; ``canonical_bytes`` of the result re-hashes to the leaf."""
    try:
        document = json.loads(line)
        if document.get("v") != CANONICAL_VERSION:
            raise ExportFormatError("unknown canonical record version")
        target = document["object"]
        fields = RecordFields(
            id=document["id"],
            ts=datetime.fromisoformat(document["ts"]),
            actor_type=document["actor"]["type"],
            actor_id=document["actor"]["id"],
            institution_id=document["institution"],
            action=document["action"],
            object_type=None if target is None else target["type"],
            object_id=None if target is None else target["id"],
            outcome=document["outcome"],
            ip=document["ip"],
            user_agent=document["user_agent"],
            request_id=document["request_id"],
        )
        return LoggedRecord(int(document["leaf_index"]), fields)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExportFormatError from exc


def jsonl_stream(records: Iterable[LoggedRecord]) -> Iterator[bytes]:
    for item in records:
        yield jsonl_line(item)


# -- FHIR R4 AuditEvent -------------------------------------------------------------------

# phivault's own code and naming systems. ``.example`` (RFC 2606) until the project
# publishes its CodeSystem at a URL it controls; SIEM rules match on these strings.
PHIVAULT_SYSTEM_BASE = "https://phivault.example/fhir"
ACTION_SYSTEM = f"{PHIVAULT_SYSTEM_BASE}/CodeSystem/audit-action"
ACTOR_TYPE_SYSTEM = f"{PHIVAULT_SYSTEM_BASE}/CodeSystem/actor-type"
ACTOR_ID_SYSTEM = f"{PHIVAULT_SYSTEM_BASE}/NamingSystem/actor"
OBJECT_ID_SYSTEM = f"{PHIVAULT_SYSTEM_BASE}/NamingSystem/object"
INSTITUTION_ID_SYSTEM = f"{PHIVAULT_SYSTEM_BASE}/NamingSystem/institution"
LOG_SYSTEM = f"{PHIVAULT_SYSTEM_BASE}/NamingSystem/audit-log"
LEAF_INDEX_EXTENSION = f"{PHIVAULT_SYSTEM_BASE}/StructureDefinition/audit-leaf-index"
REQUEST_ID_EXTENSION = f"{PHIVAULT_SYSTEM_BASE}/StructureDefinition/request-id"

# HL7 terminology used by AuditEvent (R4 §6.4, valueset-audit-event-type etc.).
AUDIT_EVENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-type"
DICOM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"

_REST = {"system": AUDIT_EVENT_TYPE_SYSTEM, "code": "rest", "display": "RESTful Operation"}
# DICOM PS3.15 Annex A.5 / PS3.16 CID 400 audit event IDs for the events they describe.
_DICOM_EXPORT = {"system": DICOM_SYSTEM, "code": "110106", "display": "Export"}
_DICOM_QUERY = {"system": DICOM_SYSTEM, "code": "110112", "display": "Query"}
_DICOM_LOGIN = {"system": DICOM_SYSTEM, "code": "110114", "display": "User Authentication"}
_DICOM_SECURITY = {"system": DICOM_SYSTEM, "code": "110113", "display": "Security Alert"}
_DICOM_ACTIVITY = {"system": DICOM_SYSTEM, "code": "110100", "display": "Application Activity"}

# AuditEvent.outcome (R4 valueset-audit-event-outcome): 0 success, 4 minor failure (the
# request was refused), 8 serious failure (the action failed).
_FHIR_OUTCOME = {Outcome.SUCCESS.value: "0", Outcome.DENIED.value: "4", Outcome.FAILURE.value: "8"}

# AuditEvent.action (R4 valueset-audit-event-action) from the verb of ``resource.verb``.
_VERB_ACTION = {
    "C": {"create", "add", "register", "activate", "upload", "import", "issue", "invite"},
    "R": {"read", "view", "list", "search", "query", "export", "download", "verify", "print"},
    "U": {"update", "rotate", "change", "enable", "disable", "reset", "revoke", "grant", "lock", "unlock"},
    "D": {"delete", "shred", "prune", "purge", "remove", "destroy"},
}


def _event_action(action: str) -> str:
    verb = action.rsplit(".", 1)[-1].rsplit("_", 1)[-1]
    for code, verbs in _VERB_ACTION.items():
        if verb in verbs:
            return code
    return "E"  # Execute: anything that is not plainly create/read/update/delete


def _event_type(fields: RecordFields) -> dict[str, str]:
    if fields.action == AuditAction.AUDIT_EXPORT:
        return _DICOM_EXPORT
    if fields.action == AuditAction.AUDIT_READ:
        return _DICOM_QUERY
    resource = fields.action.split(".", 1)[0]
    if resource in {"auth", "session", "login"}:
        return _DICOM_LOGIN
    if resource in {"key", "audit"}:
        return _DICOM_SECURITY
    # An API request carries a request id: a RESTful operation. Otherwise phivault acted itself.
    return _REST if fields.request_id is not None else _DICOM_ACTIVITY


def audit_event(item: LoggedRecord, observer: Observer) -> dict[str, object]:
    """One record as a FHIR R4 ``AuditEvent`` resource (JSON-ready)."""
    fields = item.fields
    agent: dict[str, object] = {
        "type": {"coding": [{"system": ACTOR_TYPE_SYSTEM, "code": fields.actor_type}]},
        "who": {"identifier": {"system": f"{ACTOR_ID_SYSTEM}/{fields.actor_type}", "value": fields.actor_id}},
        "requestor": True,
    }
    if fields.ip is not None:
        agent["network"] = {"address": fields.ip, "type": "2"}  # 2 = IP address
    entities: list[dict[str, object]] = []
    if fields.object_type is not None and fields.object_id is not None:
        entities.append(
            {
                "what": {
                    "identifier": {
                        "system": f"{OBJECT_ID_SYSTEM}/{fields.object_type}",
                        "value": fields.object_id,
                    }
                },
                "type": {"system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object"},
            }
        )
    if fields.institution_id is not None:
        entities.append(
            {
                "what": {"identifier": {"system": INSTITUTION_ID_SYSTEM, "value": fields.institution_id}},
                "type": {"system": ENTITY_TYPE_SYSTEM, "code": "3", "display": "Organization"},
            }
        )
    extensions: list[dict[str, object]] = [
        {"url": LEAF_INDEX_EXTENSION, "valueUnsignedInt": item.leaf_index},
    ]
    if fields.request_id is not None:
        extensions.append({"url": REQUEST_ID_EXTENSION, "valueString": fields.request_id})
    event: dict[str, object] = {
        "resourceType": "AuditEvent",
        "id": fields.id,
        "extension": extensions,
        "type": _event_type(fields),
        "subtype": [{"system": ACTION_SYSTEM, "code": fields.action}],
        "action": _event_action(fields.action),
        "recorded": format_ts(fields.ts),
        "outcome": _FHIR_OUTCOME.get(fields.outcome, "8"),
        "agent": [agent],
        "source": {
            "site": observer.log_name,
            "observer": {
                "identifier": {"system": LOG_SYSTEM, "value": observer.log_name},
                "display": f"{observer.log_name} on {observer.hostname}",
            },
            "type": [{"system": SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}],
        },
    }
    if entities:
        event["entity"] = entities
    return event


def fhir_bundle_stream(
    records: Iterable[LoggedRecord], observer: Observer, *, now: datetime, bundle_id: str
) -> Iterator[bytes]:
    """A FHIR R4 ``Bundle`` (type ``collection``) of ``AuditEvent``, written entry by entry."""
    head = {"resourceType": "Bundle", "id": bundle_id, "type": "collection", "timestamp": format_ts(now)}
    yield _dumps(head)[:-1].encode() + b',"entry":['
    separator = b"\n"
    for item in records:
        entry = {"fullUrl": f"urn:uuid:{item.fields.id}", "resource": audit_event(item, observer)}
        yield separator + _dumps(entry).encode()
        separator = b",\n"
    yield b"\n]}\n"


# -- RFC 5424 syslog ----------------------------------------------------------------------


class Facility(IntEnum):
    """RFC 5424 §6.2.1 Table 1 facilities phivault may log under."""

    AUTHPRIV = 10  # security/authorization messages (private)
    LOCAL0 = 16


# RFC 5424 §6.2.1 Table 2 severities, from the record's outcome.
_SEVERITY = {Outcome.SUCCESS.value: 6, Outcome.DENIED.value: 4, Outcome.FAILURE.value: 3}
APP_NAME = "phivault"
# SD-ID ``name@<private enterprise number>`` (RFC 5424 §7.2.2). 32473 is the IANA number
# reserved for documentation (RFC 5612): replace it once phivault has its own PEN.
SD_ID = "phivault@32473"
_MSGID_MAX = 32  # RFC 5424 §6: MSGID = 1*32PRINTUSASCII
_HOSTNAME_MAX = 255  # RFC 5424 §6: HOSTNAME = 1*255PRINTUSASCII
_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _header_field(value: str, limit: int) -> str:
    cleaned = _NOT_PRINTUSASCII.sub("_", value)[:limit]
    return cleaned or "-"


def sd_escape(value: str) -> str:
    r"""A PARAM-VALUE per RFC 5424 §6.3.3: ``"``, ``\`` and ``]`` escaped with a backslash.

    Control characters become U+FFFD: §6.3.3 allows no other escape, and a raw line break
    would split the message for receivers that read line by line.
    """
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return _CONTROL.sub("\ufffd", escaped)


def syslog_message(
    item: LoggedRecord, observer: Observer, *, facility: Facility = Facility.AUTHPRIV
) -> bytes:
    """One record as an RFC 5424 SYSLOG-MSG (no trailing newline, no MSG part)."""
    fields = item.fields
    pri = facility * 8 + _SEVERITY.get(fields.outcome, 3)
    params = (
        ("id", fields.id),
        ("leaf", str(item.leaf_index)),
        ("log", observer.log_name),
        ("actor_type", fields.actor_type),
        ("actor", fields.actor_id),
        ("institution", fields.institution_id),
        ("object_type", fields.object_type),
        ("object", fields.object_id),
        ("outcome", fields.outcome),
        ("ip", fields.ip),
        ("ua", fields.user_agent),
        ("request_id", fields.request_id),
    )
    sd = " ".join(f'{name}="{sd_escape(value)}"' for name, value in params if value is not None)
    # HEADER: PRI VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID (§6.2);
    # PROCID is NILVALUE: the record was written by some earlier process, not this one.
    header = (
        f"<{pri}>1 {format_ts(fields.ts)} {_header_field(observer.hostname, _HOSTNAME_MAX)} "
        f"{APP_NAME} - {_header_field(fields.action, _MSGID_MAX)}"
    )
    return f"{header} [{SD_ID} {sd}]".encode()


def syslog_stream(records: Iterable[LoggedRecord], observer: Observer) -> Iterator[bytes]:
    """One RFC 5424 message per line (the framing of a file; SIEM forwarding frames by length)."""
    for item in records:
        yield syslog_message(item, observer) + b"\n"


# -- the export service -------------------------------------------------------------------


def encode(
    fmt: ExportFormat, records: Iterable[LoggedRecord], observer: Observer, *, now: datetime, export_id: str
) -> Iterator[bytes]:
    if fmt is ExportFormat.JSONL:
        return jsonl_stream(records)
    if fmt is ExportFormat.FHIR:
        return fhir_bundle_stream(records, observer, now=now, bundle_id=export_id)
    return syslog_stream(records, observer)


def export_log(  # noqa: PLR0913  # who, what and how, named at every call site
    db: Database,
    fmt: ExportFormat,
    filters: ExportFilter,
    subject: Subject,
    observer: Observer,
    *,
    now: datetime,
    context: RequestContext = NO_CONTEXT,
    batch_size: int = EXPORT_BATCH,
    progress: Callable[[int], None] | None = None,
) -> Iterator[bytes]:
    """Audit the export (committed now, before any byte) and return the encoded stream.

    The ``AUDIT_EXPORT`` record names the export id (also the FHIR Bundle's id) and is filed
    under the exported institution, so that institution's auditors see who exported it.
    ``progress`` is called with the number of leaves read so far (compare with the tree
    size) after each exported record.
    """
    with db.transaction() as session:
        # The tree as it stands now: the export's own record (and anything integrated while
        # the stream is read) is not part of this export.
        stop = tree_size(session)
        export_id = record(
            session,
            AuditAction.AUDIT_EXPORT,
            subject,
            Target("audit_export", fmt.value),
            Outcome.SUCCESS,
            now=now,
            context=context,
            institution_id=filters.institution_id,
        )
    records = iter_records(db, filters, batch_size=batch_size, stop=stop)
    if progress is not None:
        records = _reporting(records, progress)
    return encode(fmt, records, observer, now=now, export_id=export_id)


def _reporting(records: Iterator[LoggedRecord], progress: Callable[[int], None]) -> Iterator[LoggedRecord]:
    for item in records:
        yield item
        progress(item.leaf_index + 1)
