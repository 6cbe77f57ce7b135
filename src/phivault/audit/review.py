"""Reviewing the audit log (issue 4 §5): newest first, filtered, with cursor pagination,
scoped to the reader's institution (a platform operator: the platform's own records).

Every page read is itself recorded (``audit.read``) in the same transaction.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.canonical import RecordFields
from phivault.audit.errors import AuditError
from phivault.audit.export import ExportFilter, conditions, scoped
from phivault.audit.models import AuditLeaf, AuditRecord
from phivault.audit.service import NO_CONTEXT, RECORD_COLUMNS, RequestContext, Subject, record
from phivault.db.engine import Database

MAX_PAGE = 1000
_CURSOR_PREFIX = "v1:"


class InvalidReviewRequest(AuditError):
    """A malformed cursor or filter (answered 400)."""

    default_message = "invalid audit review request"


@dataclass(frozen=True, slots=True)
class ReviewedEvent:
    fields: RecordFields
    leaf_index: int | None  # None until the sequencer has integrated the record


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[ReviewedEvent]
    next_cursor: str | None


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidReviewRequest("cursor is not one this service issued") from None
    if not text.startswith(_CURSOR_PREFIX) or not text[len(_CURSOR_PREFIX) :].isdigit():
        raise InvalidReviewRequest("cursor is not one this service issued")
    return int(text[len(_CURSOR_PREFIX) :])


def review_events(
    db: Database,
    subject: Subject,
    filters: ExportFilter,
    *,
    cursor: str | None,
    limit: int,
    now: datetime,
    context: RequestContext = NO_CONTEXT,
) -> EventPage:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidReviewRequest(f"limit must be between 1 and {MAX_PAGE}")
    if filters.since is not None and filters.until is not None and filters.since >= filters.until:
        raise InvalidReviewRequest("since must be before until")
    if filters.outcome is not None and filters.outcome not in set(Outcome):
        raise InvalidReviewRequest("unknown outcome")
    filters = scoped(subject, filters)
    query = (
        select(AuditRecord.seq, AuditLeaf.leaf_index, *RECORD_COLUMNS)
        .outerjoin(AuditLeaf, AuditLeaf.record_seq == AuditRecord.seq)
        .where(*conditions(filters))
        .order_by(AuditRecord.seq.desc())
        .limit(limit + 1)
    )
    if cursor is not None:
        query = query.where(AuditRecord.seq < decode_cursor(cursor))
    with db.transaction() as session:
        rows = session.execute(query).all()
        record(
            session,
            AuditAction.AUDIT_READ,
            subject,
            None,
            Outcome.SUCCESS,
            now=now,
            context=context,
            institution_id=filters.institution_id,
        )
    more = len(rows) > limit
    rows = rows[:limit]
    events = [ReviewedEvent(RecordFields._make(row[2:]), row[1]) for row in rows]
    return EventPage(events, encode_cursor(rows[-1][0]) if more else None)
