"""Tables of the audit log (main database). All of them are append-only: database
triggers (migration 0002) refuse UPDATE and DELETE, except the tree head, which is derived
state, and the pruning of records older than the retention lock.

- ``audit_records``: one row per event, in the order they were written (``seq``).
- ``audit_leaves``: the Merkle tree's leaves; leaf ``leaf_index`` is record ``record_seq``.
  A record becomes a leaf when the sequencer integrates it (a moment after its commit).
- ``audit_nodes``: hashes of the perfect subtrees above the leaves (level ≥ 1), so proofs
  need no rehashing.
- ``audit_tree_head``: the current size and frontier (compact range) of the tree.
- ``audit_checkpoints``: signed checkpoints (transparency-dev checkpoint format).
- ``audit_signing_keys``: checkpoint keys; the private key wrapped by the keyring.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, SmallInteger, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from phivault.db.models import Base

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
SequenceInteger = BigInteger().with_variant(Integer, "sqlite")


class AuditRecord(Base):
    __tablename__ = "audit_records"

    seq: Mapped[int] = mapped_column(SequenceInteger, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    ts: Mapped[datetime]
    actor_type: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str] = mapped_column(String(64))
    institution_id: Mapped[str | None] = mapped_column(String(36))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str | None] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(128))
    outcome: Mapped[str] = mapped_column(String(16))
    ip: Mapped[str | None] = mapped_column(String(45))
    user_agent: Mapped[str | None] = mapped_column(String(256))
    request_id: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_audit_records_institution_ts", "institution_id", "ts"),
        Index("ix_audit_records_actor", "actor_id"),
        Index("ix_audit_records_action", "action"),
        Index("ix_audit_records_object", "object_type", "object_id"),
    )


class AuditLeaf(Base):
    __tablename__ = "audit_leaves"

    leaf_index: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    record_seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class AuditNode(Base):
    __tablename__ = "audit_nodes"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    node_index: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class AuditTreeHead(Base):
    __tablename__ = "audit_tree_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    size: Mapped[int] = mapped_column(BigInteger)
    frontier: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime]


class AuditCheckpoint(Base):
    __tablename__ = "audit_checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    note: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime]


class AuditSigningKey(Base):
    __tablename__ = "audit_signing_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    origin: Mapped[str] = mapped_column(String(128))
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    wrapped_private_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]


class AuditPruneWindow(Base):
    """Authorises deleting records up to ``up_to_seq`` (and older than the retention lock).

    The delete trigger checks both this row and the records' age, so nothing younger than
    six months can be removed even by code that writes here.
    """

    __tablename__ = "audit_prune_window"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    up_to_seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]


class AuditForwardCursor(Base):
    """How far the audit log has been delivered to one SIEM destination (``host:port``).

    ``next_leaf_index`` is the first leaf not yet confirmed delivered; it only moves forward,
    after a batch was sent and the TLS connection closed cleanly (at-least-once). A forwarder
    holds the row through a lease (``lease_token`` until ``lease_expires_at``) rather than a
    row lock, so no database lock is held while talking to the SIEM. ``retry_at`` and
    ``failures`` give a back-off every replica respects while the SIEM is down.
    """

    __tablename__ = "audit_forward_cursors"

    destination: Mapped[str] = mapped_column(String(300), primary_key=True)
    next_leaf_index: Mapped[int] = mapped_column(BigInteger)
    failures: Mapped[int] = mapped_column(Integer)
    retry_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(200))
    last_delivered_at: Mapped[datetime | None]
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
