"""Migration 0003 creates exactly the key hierarchy tables the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from phivault.crypto.models import InstitutionKey, KeyRotation, PatientKey, PurgeLedgerEntry
from phivault.db.models import Base
from phivault.runtime import Runtime

KEY_TABLES = tuple(
    model.__tablename__ for model in (InstitutionKey, PatientKey, PurgeLedgerEntry, KeyRotation)
)


def test_migrated_key_tables_match_the_models(runtime: Runtime) -> None:
    with runtime.db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = [
            difference
            for difference in compare_metadata(context, Base.metadata)
            if any(table in repr(difference) for table in KEY_TABLES)
        ]
    assert differences == []
