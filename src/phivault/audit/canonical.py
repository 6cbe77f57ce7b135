"""The canonical bytes of an audit record: what the Merkle tree hashes.

A JSON object with its members in lexicographic order, no insignificant white space,
UTF-8 — RFC 8785 (JCS) for the only value types a record holds (strings and null). ``v``
versions the layout. Timestamps are UTC with microseconds and a ``Z``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

CANONICAL_VERSION = "1"


class RecordFields(NamedTuple):
    """The hashed fields of a record, in the order the queries select them."""

    id: str
    ts: datetime
    actor_type: str
    actor_id: str
    institution_id: str | None
    action: str
    object_type: str | None
    object_id: str | None
    outcome: str
    ip: str | None
    user_agent: str | None
    request_id: str | None


def format_ts(moment: datetime) -> str:
    """The UTC time as ``isoformat(timespec="microseconds")`` writes it, with ``Z`` for ``+00:00``."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # From the fields: isoformat of an aware time also formats its offset, which made it the
    # slowest step of hashing a record. Tests compare the two forms.
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031  # measured faster than f-string
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.microsecond,
    )


def canonical_bytes(fields: RecordFields | Sequence[Any]) -> bytes:
    """The canonical bytes of a record; ``fields`` is a ``RecordFields`` or any row whose
    first twelve columns are selected in ``RecordFields`` order (``RECORD_COLUMNS``).

    The timestamp is a ``datetime``, or the text ``format_ts`` writes for it (a verifier
    that reads that text straight from the database need not parse it first).
    """
    # Written out by hand rather than through json.dumps, and without a helper call per
    # member: verifying a million records spends much of its time here. Members in sorted
    # order; strings escaped by the json module's own (C) escaper, which leaves non-ASCII as
    # is and writes control characters as \u00xx — the RFC 8785 forms. Tests check the output
    # against json.dumps(sort_keys=True) and against leaf hashes of v1 records.
    e = _escape
    (
        record_id,
        ts,
        actor_type,
        actor_id,
        institution,
        action,
        object_type,
        object_id,
        outcome,
        ip,
        agent,
        request,
    ) = fields[:12]
    target = (
        "null"
        if object_type is None
        else f'{{"id":{"null" if object_id is None else e(object_id)},"type":{e(object_type)}}}'
    )
    return (
        f'{{"action":{e(action)},"actor":{{"id":{e(actor_id)},"type":{e(actor_type)}}},'
        f'"id":{e(record_id)},"institution":{"null" if institution is None else e(institution)},'
        f'"ip":{"null" if ip is None else e(ip)},"object":{target},"outcome":{e(outcome)},'
        f'"request_id":{"null" if request is None else e(request)},'
        f'"ts":"{ts if isinstance(ts, str) else format_ts(ts)}",'
        f'"user_agent":{"null" if agent is None else e(agent)},"v":"{CANONICAL_VERSION}"}}'
    ).encode()


_escape = json.encoder.encode_basestring  # C-accelerated; leaves non-ASCII unescaped
