"""Migration 0009 creates exactly the tables of share links and exports that the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from phivault.db.models import Base
from phivault.exams.outbound_models import ExamExport, ExamExportItem, PacsDestination, ShareItem, ShareLink
from phivault.runtime import Runtime

TABLES = tuple(
    model.__tablename__ for model in (ShareLink, ShareItem, PacsDestination, ExamExport, ExamExportItem)
)


def test_share_and_export_tables_match_their_models(runtime: Runtime) -> None:
    with runtime.db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = [
            repr(difference)
            for difference in compare_metadata(context, Base.metadata)
            if any(table in repr(difference) for table in TABLES)
        ]
    assert differences == []
