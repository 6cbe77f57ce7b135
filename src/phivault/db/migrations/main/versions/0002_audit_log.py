"""audit log: records, Merkle leaves and nodes, checkpoints; append-only triggers

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 10:51:30.973536
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("key_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("size", name=op.f("pk_audit_checkpoints")),
    )
    op.create_table(
        "audit_leaves",
        sa.Column("leaf_index", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("record_seq", sa.BigInteger(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("leaf_index", name=op.f("pk_audit_leaves")),
        sa.UniqueConstraint("record_seq", name=op.f("uq_audit_leaves_record_seq")),
    )
    op.create_table(
        "audit_nodes",
        sa.Column("level", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("node_index", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("level", "node_index", name=op.f("pk_audit_nodes")),
    )
    op.create_table(
        "audit_prune_window",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("up_to_seq", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_prune_window")),
    )
    op.create_table(
        "audit_records",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_type", sa.String(length=16), nullable=False),
        sa.Column("actor_id", sa.String(length=64), nullable=False),
        sa.Column("institution_id", sa.String(length=36), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("object_type", sa.String(length=32), nullable=True),
        sa.Column("object_id", sa.String(length=128), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("ip", sa.String(length=45), nullable=True),
        sa.Column("user_agent", sa.String(length=256), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_records")),
        sa.UniqueConstraint("id", name=op.f("uq_audit_records_id")),
    )
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.create_index("ix_audit_records_action", ["action"], unique=False)
        batch_op.create_index("ix_audit_records_actor", ["actor_id"], unique=False)
        batch_op.create_index("ix_audit_records_institution_ts", ["institution_id", "ts"], unique=False)
        batch_op.create_index("ix_audit_records_object", ["object_type", "object_id"], unique=False)

    op.create_table(
        "audit_signing_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("origin", sa.String(length=128), nullable=False),
        sa.Column("public_key", sa.LargeBinary(length=32), nullable=False),
        sa.Column("wrapped_private_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_signing_keys")),
    )
    op.create_table(
        "audit_tree_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("frontier", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_tree_head")),
    )

    # The empty tree: size 0, a frontier of no hashes (8-byte big-endian size only).
    head = sa.table(
        "audit_tree_head",
        sa.column("id", sa.Integer),
        sa.column("size", sa.BigInteger),
        sa.column("frontier", sa.LargeBinary),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    op.bulk_insert(head, [{"id": 1, "size": 0, "frontier": bytes(8), "updated_at": datetime.now(UTC)}])
    _create_append_only_triggers()


def downgrade() -> None:
    _drop_append_only_triggers()
    op.drop_table("audit_tree_head")
    op.drop_table("audit_signing_keys")
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_records_object")
        batch_op.drop_index("ix_audit_records_institution_ts")
        batch_op.drop_index("ix_audit_records_actor")
        batch_op.drop_index("ix_audit_records_action")

    op.drop_table("audit_records")
    op.drop_table("audit_prune_window")
    op.drop_table("audit_nodes")
    op.drop_table("audit_leaves")
    op.drop_table("audit_checkpoints")


# Tables that never change once written. The tree head is derived state and may be updated.
APPEND_ONLY = ("audit_leaves", "audit_nodes", "audit_checkpoints", "audit_signing_keys", "audit_prune_window")
# The minimum retention lock, 183 days (six months), is written into the delete triggers
# below: no record younger can be deleted by anyone, whatever the application asks; a
# longer lock is enforced by the application.


def _create_append_only_triggers() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in (*APPEND_ONLY, "audit_records"):
            op.execute(
                f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'audit log is append-only: UPDATE on {table} refused'); END"
            )
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'audit log is append-only: DELETE on {table} refused'); END"
            )
        op.execute(
            "CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records "
            "WHEN NOT (OLD.ts < datetime('now', '-183 days') "
            "AND EXISTS (SELECT 1 FROM audit_prune_window w WHERE OLD.seq <= w.up_to_seq)) "
            "BEGIN SELECT RAISE(ABORT, 'audit records inside the retention lock cannot be deleted'); END"
        )
        return
    op.execute(
        """
        CREATE FUNCTION phivault_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit log is append-only: % on % refused', TG_OP, TG_TABLE_NAME;
        END $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION phivault_audit_record_delete() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.ts < now() - interval '183 days'
               AND EXISTS (SELECT 1 FROM audit_prune_window w WHERE OLD.seq <= w.up_to_seq) THEN
                RETURN OLD;
            END IF;
            RAISE EXCEPTION 'audit records inside the retention lock cannot be deleted';
        END $$
        """
    )
    for table in APPEND_ONLY:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION phivault_audit_append_only()"
        )
    op.execute(
        "CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records "
        "FOR EACH ROW EXECUTE FUNCTION phivault_audit_append_only()"
    )
    op.execute(
        "CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records "
        "FOR EACH ROW EXECUTE FUNCTION phivault_audit_record_delete()"
    )
    for table in (*APPEND_ONLY, "audit_records"):
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION phivault_audit_append_only()"
        )


def _drop_append_only_triggers() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in (*APPEND_ONLY, "audit_records"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
        return
    op.execute("DROP FUNCTION IF EXISTS phivault_audit_append_only() CASCADE")
    op.execute("DROP FUNCTION IF EXISTS phivault_audit_record_delete() CASCADE")
