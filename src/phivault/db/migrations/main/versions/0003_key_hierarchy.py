"""key hierarchy: patient and institution keys, purge ledger, rotation state

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "institution_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("root_key_id", sa.String(length=200), nullable=False),
        sa.Column("root_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_institution_keys")),
        sa.UniqueConstraint("institution_id", "version", name="uq_institution_keys_institution_version"),
    )
    op.create_index("ix_institution_keys_institution_id", "institution_keys", ["institution_id"])
    op.create_index("ix_institution_keys_root_version", "institution_keys", ["root_version"])
    op.create_index(
        "uq_institution_keys_one_current",
        "institution_keys",
        ["institution_id"],
        unique=True,
        sqlite_where=sa.text("status = 'current'"),
        postgresql_where=sa.text("status = 'current'"),
    )
    op.create_table(
        "patient_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=64), nullable=False),
        sa.Column("institution_key_id", sa.String(length=36), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["institution_key_id"],
            ["institution_keys.id"],
            name=op.f("fk_patient_keys_institution_key_id_institution_keys"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_keys")),
    )
    op.create_index("ix_patient_keys_institution_id", "patient_keys", ["institution_id"])
    op.create_index("ix_patient_keys_institution_key_id", "patient_keys", ["institution_key_id"])
    op.create_table(
        "purge_ledger",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("patient_key_id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=64), nullable=False),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_type", sa.String(length=16), nullable=False),
        sa.Column("actor_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_purge_ledger")),
        sa.UniqueConstraint("patient_key_id", name=op.f("uq_purge_ledger_patient_key_id")),
    )
    op.create_index("ix_purge_ledger_institution_id", "purge_ledger", ["institution_id"])
    op.create_table(
        "key_rotations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("scope_key", sa.String(length=100), nullable=False),
        sa.Column("institution_id", sa.String(length=64), nullable=True),
        sa.Column("from_version", sa.Integer(), nullable=False),
        sa.Column("to_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("cursor", sa.String(length=36), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("rewrapped", sa.Integer(), nullable=False),
        sa.Column("batches", sa.Integer(), nullable=False),
        sa.Column("retired_version", sa.Integer(), nullable=True),
        sa.Column("settle_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_key_rotations")),
    )
    op.create_index(
        "uq_key_rotations_one_active",
        "key_rotations",
        ["scope_key"],
        unique=True,
        sqlite_where=sa.text("status <> 'completed'"),
        postgresql_where=sa.text("status <> 'completed'"),
    )
    op.create_index("ix_key_rotations_started_at", "key_rotations", ["started_at"])
    _create_purge_ledger_triggers()


def downgrade() -> None:
    _drop_purge_ledger_triggers()
    op.drop_index("ix_key_rotations_started_at", table_name="key_rotations")
    op.drop_index("uq_key_rotations_one_active", table_name="key_rotations")
    op.drop_table("key_rotations")
    op.drop_index("ix_purge_ledger_institution_id", table_name="purge_ledger")
    op.drop_table("purge_ledger")
    op.drop_index("ix_patient_keys_institution_key_id", table_name="patient_keys")
    op.drop_index("ix_patient_keys_institution_id", table_name="patient_keys")
    op.drop_table("patient_keys")
    op.drop_index("uq_institution_keys_one_current", table_name="institution_keys")
    op.drop_index("ix_institution_keys_root_version", table_name="institution_keys")
    op.drop_index("ix_institution_keys_institution_id", table_name="institution_keys")
    op.drop_table("institution_keys")


# The purge ledger is evidence that data was destroyed and the list a restore re-applies:
# once written, no row may change or go away (as the audit tables of 0002).
def _create_purge_ledger_triggers() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER purge_ledger_no_{verb.lower()} BEFORE {verb} ON purge_ledger "
                f"BEGIN SELECT RAISE(ABORT, 'purge ledger is append-only: {verb} refused'); END"
            )
        return
    op.execute(
        """
        CREATE FUNCTION phivault_purge_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'purge ledger is append-only: % refused', TG_OP;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER purge_ledger_append_only BEFORE UPDATE OR DELETE ON purge_ledger "
        "FOR EACH ROW EXECUTE FUNCTION phivault_purge_ledger_append_only()"
    )
    op.execute(
        "CREATE TRIGGER purge_ledger_no_truncate BEFORE TRUNCATE ON purge_ledger "
        "FOR EACH STATEMENT EXECUTE FUNCTION phivault_purge_ledger_append_only()"
    )


def _drop_purge_ledger_triggers() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS purge_ledger_no_update")
        op.execute("DROP TRIGGER IF EXISTS purge_ledger_no_delete")
        return
    op.execute("DROP FUNCTION IF EXISTS phivault_purge_ledger_append_only() CASCADE")
