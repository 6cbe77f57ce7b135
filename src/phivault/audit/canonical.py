"""The canonical bytes of an audit record: what the Merkle tree hashes.

A JSON object with its members in lexicographic order, no insignificant white space,
UTF-8 — RFC 8785 (JCS) for the only value types a record holds (strings and null). ``v``
versions the layout. Timestamps are UTC with microseconds and a ``Z``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import NamedTuple

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
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def canonical_bytes(fields: RecordFields) -> bytes:
    target = None if fields.object_type is None else {"id": fields.object_id, "type": fields.object_type}
    # Members written in sorted order (checked by a test against sort_keys=True).
    document = {
        "action": fields.action,
        "actor": {"id": fields.actor_id, "type": fields.actor_type},
        "id": fields.id,
        "institution": fields.institution_id,
        "ip": fields.ip,
        "object": target,
        "outcome": fields.outcome,
        "request_id": fields.request_id,
        "ts": format_ts(fields.ts),
        "user_agent": fields.user_agent,
        "v": CANONICAL_VERSION,
    }
    return _dumps(document).encode()
