"""``audit verify`` reads SQLite's stored timestamp text without parsing it; the text it
makes must be the one ``format_ts`` makes of the time SQLAlchemy would have returned.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import psycopg

from phivault.audit.canonical import canonical_bytes, format_ts
from phivault.audit.models import AuditRecord
from phivault.audit.verify import _ts_reader

MOMENTS = [
    datetime(2026, 1, 1, tzinfo=UTC),  # no microseconds: SQLite still stores six digits
    datetime(2026, 6, 30, 23, 59, 59, 1, tzinfo=UTC),
    datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2027, 1, 1, 1, 0, 0, 500000, tzinfo=timezone(timedelta(hours=1, minutes=30))),
]


def _stored_on_sqlite(moment: datetime) -> str:
    """The text SQLAlchemy writes for ``moment`` into ``audit_records.ts`` on SQLite."""
    dialect = sqlite.dialect()
    column_type = AuditRecord.ts.type
    value = column_type.process_bind_param(moment, dialect)
    bind = column_type.dialect_impl(dialect).impl_instance.bind_processor(dialect)
    assert bind is not None
    text = bind(value)
    assert isinstance(text, str)
    return text


@pytest.mark.parametrize("moment", MOMENTS, ids=str)
def test_sqlite_text_reads_as_the_canonical_time(moment: datetime) -> None:
    read = _ts_reader(sqlite.dialect())
    assert read(_stored_on_sqlite(moment)) == format_ts(moment)


@pytest.mark.parametrize("moment", MOMENTS, ids=str)
def test_other_text_on_sqlite_is_parsed_as_sqlalchemy_parses_it(moment: datetime) -> None:
    read = _ts_reader(sqlite.dialect())
    other_shape = _stored_on_sqlite(moment).replace(" ", "T")
    parsed = read(other_shape)
    assert isinstance(parsed, datetime)
    assert format_ts(parsed) == format_ts(moment)


@pytest.mark.parametrize("raw", ['2026-01-01 00:00:00.00000"', "yesterday", "2026-13-45 00:00:00.000000x"])
def test_a_value_that_is_no_time_reads_as_text_no_record_hashed(raw: str) -> None:
    read = _ts_reader(sqlite.dialect())
    value = read(raw)
    assert isinstance(value, str)
    assert value.startswith("not a time: ")
    # Still one JSON string inside the record's canonical bytes:
    record = json.loads(
        canonical_bytes(("r", value, "user", "u", None, "a", None, None, "ok", None, None, None))
    )
    assert record["ts"].startswith("not a time: ")


def test_postgresql_values_are_datetimes_as_sqlalchemy_returns_them() -> None:
    read = _ts_reader(psycopg.dialect())  # type: ignore[no-untyped-call]  # SQLAlchemy leaves it unannotated
    moment = datetime(2026, 6, 30, 23, 59, 59, 1, tzinfo=UTC)
    assert read(moment) == moment
