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
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # isoformat is implemented in C; its "+00:00" suffix becomes the "Z" form.
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"


def canonical_bytes(fields: RecordFields | Sequence[Any]) -> bytes:
    """The canonical bytes of a record; ``fields`` is a ``RecordFields`` or any row whose
    first twelve columns are selected in ``RecordFields`` order (``RECORD_COLUMNS``).
    """
    # Written out by hand rather than through json.dumps: verifying a million records spends
    # most of its time here. Members in sorted order; strings escaped by the json module's
    # own (C) escaper, which leaves non-ASCII as is and writes control characters as \u00xx —
    # the RFC 8785 forms. A test checks the output against json.dumps(sort_keys=True).
    q = _quote
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
    target = "null" if object_type is None else f'{{"id":{q(object_id)},"type":{q(object_type)}}}'
    return (
        f'{{"action":{q(action)},"actor":{{"id":{q(actor_id)},"type":{q(actor_type)}}},'
        f'"id":{q(record_id)},"institution":{q(institution)},"ip":{q(ip)},'
        f'"object":{target},"outcome":{q(outcome)},"request_id":{q(request)},'
        f'"ts":"{format_ts(ts)}","user_agent":{q(agent)},"v":"{CANONICAL_VERSION}"}}'
    ).encode()


def _quote(value: str | None) -> str:
    return "null" if value is None else _escape(value)


_escape = json.encoder.encode_basestring  # C-accelerated; leaves non-ASCII unescaped
