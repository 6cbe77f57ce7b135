"""exams: comments, legal hold

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "exam_comments",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=36), nullable=False),
        sa.Column("study_id", sa.String(length=36), nullable=False),
        sa.Column("author_id", sa.String(length=36), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["institution_id"], ["institutions.id"], name=op.f("fk_exam_comments_institution_id_institutions")
        ),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_exam_comments_study_id_studies")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exam_comments")),
    )
    with op.batch_alter_table("exam_comments", schema=None) as batch_op:
        batch_op.create_index("ix_exam_comments_study", ["study_id", "created_at"], unique=False)
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("legal_hold_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("legal_hold_by", sa.String(length=36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("legal_hold_by")
        batch_op.drop_column("legal_hold_at")
    with op.batch_alter_table("exam_comments", schema=None) as batch_op:
        batch_op.drop_index("ix_exam_comments_study")
    op.drop_table("exam_comments")
