"""Alembic environment for the main database; run through phivault.db.migrate."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext

import phivault.accounts.models  # registers the accounts tables
import phivault.audit.models  # registers the audit tables in Base.metadata
import phivault.crypto.models  # the key hierarchy tables
import phivault.devices.models  # devices, tokens, the DPoP replay cache, uploads
import phivault.exams.models  # the exam index, quarantine, ingest policy
import phivault.exams.outbound_models  # noqa: F401  # share links, PACS destinations, exports
from phivault.db.models import Base, UTCDateTime


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:  # noqa: ANN401
    # Migrations must not import application types: UTCDateTime is stored as a plain
    # timezone-aware timestamp.
    del autogen_context
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=context.config.attributes["version_table"],
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
    compare_type=True,
    render_item=_render_item,
)
with context.begin_transaction():
    context.run_migrations()
