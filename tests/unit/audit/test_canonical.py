"""The canonical bytes of audit records: the exact bytes every stored leaf hash commits to."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from phivault.audit.canonical import RecordFields, canonical_bytes, format_ts
from phivault.audit.merkle import leaf_hash

# Leaf hashes of layout v1 as the first encoder (one quoting helper per member) wrote them.
# Stored logs are committed to these bytes: an encoder change that alters any of them makes
# every existing log fail verification.
V1_LEAF_HASHES = [
    (
        RecordFields(
            "0190a1b2-0000-7000-8000-000000000001",
            datetime(2026, 1, 1, tzinfo=UTC),
            "user",
            "user-alice",
            "inst-1",
            "exam.read",
            "exam",
            "exam-1",
            "success",
            "192.0.2.7",
            "Mozilla/5.0",
            "req-1",
        ),
        "70ea01834b6c0ada3732ff8648a4a7db13e1ee9429d4aaafa793b7073fc7b154",
    ),
    (
        RecordFields(
            "id-2",
            datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=timezone(timedelta(hours=2))),
            "system",
            "audit-sequencer",
            None,
            "audit.key_create",
            None,
            None,
            "failure",
            None,
            None,
            None,
        ),
        "4f00a5a7b0e32c5c66f4c3a7d40ae03a03ae8546b0f1a5314682e6ba73eefab9",
    ),
    (
        RecordFields(
            "id-3",
            datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            "device",
            'dev "quoted" \\ back',
            "inst-ü",
            "exam.read",
            "exam",
            None,
            "success",
            "2001:db8::1",
            "ua \x00\x01\x1f\n\t\u2028 ü 😀",
            'r"\\',
        ),
        "f049db985bc11bf45a4f90744392f70f43f8cfbd0b56635c3aa696dac64d38dd",
    ),
]


@pytest.mark.parametrize(("fields", "expected"), V1_LEAF_HASHES, ids=["plain", "nulls-and-offset", "escapes"])
def test_canonical_bytes_still_hash_to_the_v1_leaves(fields: RecordFields, expected: str) -> None:
    assert leaf_hash(canonical_bytes(fields)).hex() == expected


def _reference(fields: RecordFields) -> bytes:
    """The layout spelled out as a document and serialised by json.dumps (RFC 8785 for strings and null)."""
    document = {
        "v": "1",
        "id": fields.id,
        "ts": fields.ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": {"type": fields.actor_type, "id": fields.actor_id},
        "institution": fields.institution_id,
        "action": fields.action,
        "object": None
        if fields.object_type is None
        else {"type": fields.object_type, "id": fields.object_id},
        "outcome": fields.outcome,
        "ip": fields.ip,
        "user_agent": fields.user_agent,
        "request_id": fields.request_id,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


TRICKY = [
    None,
    "",
    "plain",
    'q"uote',
    "back\\slash",
    "ctl\x00\x07\x1f\x7f",
    "nl\r\n\t",
    "ü€😀",
    "\u2028\u2029",
    "</script>",
]


@pytest.mark.parametrize("value", TRICKY, ids=repr)
def test_every_member_is_encoded_as_sorted_compact_json(value: str | None) -> None:
    base = V1_LEAF_HASHES[0][0]
    for position in range(len(base)):
        if position == 1:  # the timestamp
            continue
        if value is None and position in (0, 2, 3, 5, 8):  # not nullable
            continue
        fields = RecordFields._make([*base[:position], value, *base[position + 1 :]])
        assert canonical_bytes(fields) == _reference(fields), base._fields[position]


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 6, 30, 23, 59, 59, 1, tzinfo=UTC),
        datetime(2027, 1, 1, 1, 0, 0, 500000, tzinfo=timezone(timedelta(hours=1, minutes=30))),
        datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-11))),
    ],
)
def test_timestamps_are_utc_with_microseconds_and_z(moment: datetime) -> None:
    fields = V1_LEAF_HASHES[0][0]._replace(ts=moment)
    assert canonical_bytes(fields) == _reference(fields)


@pytest.mark.parametrize(
    "moment",
    [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 30, 0, 10, tzinfo=timezone(timedelta(hours=14))),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_format_ts_writes_what_isoformat_writes(moment: datetime) -> None:
    assert format_ts(moment) == moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def test_a_row_with_more_columns_encodes_its_first_twelve() -> None:
    fields = V1_LEAF_HASHES[1][0]
    row = (*fields, 7, 8, b"leaf")
    assert canonical_bytes(row) == canonical_bytes(fields)
