"""The migrations of the read path create exactly the tables their models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData

from phivault.db.engine import Database
from phivault.db.models import Base, PhiBase
from phivault.exams.models import ExamComment, Study
from phivault.exams.phi_models import PhiPatientToken
from phivault.runtime import Runtime

PHI_TABLES = (PhiPatientToken.__tablename__,)
MAIN_TABLES = (ExamComment.__tablename__, Study.__tablename__)


def _differences(db: Database, metadata: MetaData, tables: tuple[str, ...]) -> list[str]:
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return [
            repr(difference)
            for difference in compare_metadata(context, metadata)
            if any(table in repr(difference) for table in tables)
        ]


def test_phi_store_token_table_matches_its_model(runtime: Runtime) -> None:
    assert _differences(runtime.phi_db, PhiBase.metadata, PHI_TABLES) == []


def test_comment_table_and_legal_hold_columns_match_their_models(runtime: Runtime) -> None:
    assert _differences(runtime.db, Base.metadata, MAIN_TABLES) == []
