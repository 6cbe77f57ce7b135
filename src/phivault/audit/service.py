"""The audit log: ``record`` an event, integrate records into the Merkle tree, sign
checkpoints, serve proofs.

Recording adds a row to the caller's transaction, so an event exists exactly when the
change it describes commits, and writers never wait on each other. A sequencer
(``integrate_pending``, run by every job worker) then appends committed records to the
RFC 9162 tree in batches under a lock on the tree head, stores the new leaves and the
perfect-subtree nodes they complete, and signs a checkpoint every N records or T seconds —
the design of Certificate Transparency logs (a short merge delay, then a signed head).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from sqlalchemy import Select, and_, bindparam, delete, event, func, insert, inspect, or_, select
from sqlalchemy.orm import Session, UOWTransaction

from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.canonical import RecordFields, canonical_bytes
from phivault.audit.checkpoint import Checkpoint, NoteVerifier, sign_checkpoint
from phivault.audit.errors import AuditError, ProofError
from phivault.audit.merkle import (
    Frontier,
    NodeId,
    consistency_proof,
    inclusion_proof_plan,
    leaf_hash,
)
from phivault.audit.models import (
    AuditCheckpoint,
    AuditLeaf,
    AuditNode,
    AuditPruneWindow,
    AuditRecord,
    AuditSigningKey,
    AuditTreeHead,
)
from phivault.crypto.keyring import Keyring, WrappedKey
from phivault.db.engine import Database
from phivault.ids import new_id

log = logging.getLogger(__name__)

HEAD_ID = 1
INTEGRATE_BATCH = 5000
MAX_USER_AGENT = 256
MAX_ID = 128
_KEY_AAD_PREFIX = b"phivault/audit-checkpoint-key/"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acted: a user, a device, a part of phivault itself, or nobody authenticated."""

    type: ActorType
    id: str

    @classmethod
    def system(cls, component: str) -> Actor:
        return cls(ActorType.SYSTEM, component)


class Subject(Protocol):
    """What ``record`` needs of the acting principal (accounts' ``Principal`` is one)."""

    @property
    def actor(self) -> Actor: ...

    @property
    def institution_id(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class SystemSubject:
    """phivault acting on its own (CLI, worker), outside any institution."""

    actor: Actor
    institution_id: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """The object acted on, by type and id (never a PHI value)."""

    type: str
    id: str


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Where a request came from; all optional (a CLI command has no IP)."""

    ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None


NO_CONTEXT = RequestContext()


def record(  # noqa: PLR0913  # the record's fields, named at every call site
    session: Session,
    action: AuditAction,
    subject: Subject,
    target: Target | None,
    outcome: Outcome,
    *,
    now: datetime,
    context: RequestContext = NO_CONTEXT,
    institution_id: str | None = None,
) -> str:
    """Add an audit record to ``session``'s transaction and return its id.

    ``institution_id`` defaults to the subject's: name it when an operator acts on an
    institution's object. The record commits or rolls back with the caller's change.
    """
    record_id = new_id()
    actor = subject.actor
    session.add(
        AuditRecord(
            id=record_id,
            ts=now,
            actor_type=actor.type.value,
            actor_id=_bounded(actor.id, MAX_ID),
            institution_id=institution_id if institution_id is not None else subject.institution_id,
            action=action.value,
            object_type=target.type if target else None,
            object_id=_bounded(target.id, MAX_ID) if target else None,
            outcome=outcome.value,
            ip=context.ip,
            user_agent=_bounded(context.user_agent, MAX_USER_AGENT),
            request_id=context.request_id,
        )
    )
    return record_id


def _bounded(value: str | None, limit: int) -> str | None:
    return None if value is None else value[:limit]


_RECORD_KEYS = tuple(column.key for column in AuditRecord.__table__.columns if column.key != "seq")


@event.listens_for(Session, "before_flush")
def _insert_records(session: Session, _flush: UOWTransaction, objects: Sequence[object] | None) -> None:
    """Write the records ``record`` added as one executemany INSERT, in the order they were added.

    The same flush, so the same transaction and savepoint, as the ORM would use; but without
    the ORM's fetching of each new row's ``seq`` (nothing reads it back), which makes the
    ORM send one INSERT … RETURNING of all rows whose text the PostgreSQL driver parses
    again for every batch. A plain executemany is pipelined by psycopg and cached by SQLite.
    """
    only = None if objects is None else {id(obj) for obj in objects}
    added = [
        item for item in session.new if isinstance(item, AuditRecord) and (only is None or id(item) in only)
    ]
    if not added:
        return
    added.sort(key=lambda item: inspect(item).insert_order or 0)
    session.connection(bind_arguments={"mapper": AuditRecord}).execute(
        insert(AuditRecord), [{key: getattr(item, key) for key in _RECORD_KEYS} for item in added]
    )
    for item in added:
        session.expunge(item)


RECORD_COLUMNS = (
    AuditRecord.id,
    AuditRecord.ts,
    AuditRecord.actor_type,
    AuditRecord.actor_id,
    AuditRecord.institution_id,
    AuditRecord.action,
    AuditRecord.object_type,
    AuditRecord.object_id,
    AuditRecord.outcome,
    AuditRecord.ip,
    AuditRecord.user_agent,
    AuditRecord.request_id,
)


class DatabaseNodeSource:
    """Serves stored tree nodes to proof generation: leaves from ``audit_leaves``,
    higher levels from ``audit_nodes``, each kind in one query.
    """

    def __init__(self, session: Session) -> None:
        self.session = session

    def get_nodes(self, ids: Sequence[NodeId]) -> Mapping[NodeId, bytes]:
        found: dict[NodeId, bytes] = {}
        leaves = [node.index for node in ids if node.level == 0]
        if leaves:
            rows = self.session.execute(_LEAVES_STATEMENT, {"leaves": leaves})
            found.update({NodeId(0, index): value for index, value in rows})
        nodes = [node for node in ids if node.level > 0]
        if nodes:
            parameters: dict[str, int] = {}
            for k, node in enumerate(nodes):
                parameters[f"l{k}"], parameters[f"i{k}"] = node.level, node.index
            stored = self.session.execute(_nodes_statement(len(nodes)), parameters)
            found.update({NodeId(level, index): value for level, index, value in stored})
        return found


_LEAVES_STATEMENT = select(AuditLeaf.leaf_index, AuditLeaf.leaf_hash).where(
    AuditLeaf.leaf_index.in_(bindparam("leaves", expanding=True))
)


@functools.lru_cache(maxsize=256)  # a proof names at most a few dozen nodes
def _nodes_statement(count: int) -> Select[int, int, bytes]:
    """``count`` stored nodes by primary key: ``(level = :l0 AND node_index = :i0) OR …``.

    Both databases use the primary key for each term (a row-value IN makes SQLite scan the
    table). Built once per count, so SQLAlchemy reuses the compiled statement: building a
    new expression for every proof cost more than running the query.
    """
    return select(AuditNode.level, AuditNode.node_index, AuditNode.hash).where(
        or_(
            *(
                and_(AuditNode.level == bindparam(f"l{k}"), AuditNode.node_index == bindparam(f"i{k}"))
                for k in range(count)
            )
        )
    )


@dataclass(frozen=True, slots=True)
class CheckpointSigner:
    key_id: str
    origin: str
    private_key: Ed25519PrivateKey

    @property
    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.origin, self.private_key.public_key())


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    every_records: int = 1000
    every: timedelta = timedelta(seconds=10)


class AuditLog:
    """The audit log of one deployment: sequencing, checkpoints and proofs."""

    def __init__(
        self, db: Database, keyring: Keyring, origin: str, policy: CheckpointPolicy | None = None
    ) -> None:
        self.db = db
        self.keyring = keyring
        self.origin = origin
        self.policy = policy or CheckpointPolicy()
        self._signer: CheckpointSigner | None = None
        self._lock = threading.Lock()

    # -- signing key ---------------------------------------------------------------------

    def signer(self, session: Session, now: datetime) -> CheckpointSigner:
        """The checkpoint key, created on first use and kept wrapped by the keyring.

        Callers hold the tree-head lock, so replicas cannot create two keys at once.
        """
        with self._lock:
            if self._signer is not None:
                return self._signer
            row = session.scalars(
                select(AuditSigningKey).order_by(AuditSigningKey.created_at.desc()).limit(1)
            ).first()
            if row is None:
                row = self._create_signing_key(session, now)
            wrapped = WrappedKey.from_bytes(row.wrapped_private_key)
            raw = self.keyring.unwrap(wrapped, aad=_KEY_AAD_PREFIX + row.id.encode())
            self._signer = CheckpointSigner(row.id, row.origin, Ed25519PrivateKey.from_private_bytes(raw))
            return self._signer

    def _create_signing_key(self, session: Session, now: datetime) -> AuditSigningKey:
        private_key = Ed25519PrivateKey.generate()
        key_id = new_id()
        raw = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        wrapped = self.keyring.wrap(raw, aad=_KEY_AAD_PREFIX + key_id.encode())
        row = AuditSigningKey(
            id=key_id,
            origin=self.origin,
            public_key=private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
            wrapped_private_key=wrapped.to_bytes(),
            created_at=now,
        )
        session.add(row)
        session.flush()
        record(
            session,
            AuditAction.AUDIT_KEY_CREATE,
            SystemSubject(Actor.system("audit-sequencer")),
            Target("audit_signing_key", key_id),
            Outcome.SUCCESS,
            now=now,
        )
        log.info("created audit checkpoint key %s", key_id)
        return row

    # -- sequencing ----------------------------------------------------------------------

    def integrate_pending(self, now: datetime, *, limit: int = INTEGRATE_BATCH) -> int:
        """Append committed records that are not in the tree yet; maybe sign a checkpoint.

        Returns how many records were integrated. Safe to run from every replica at once.
        """
        with self.db.transaction() as session:
            head = session.get(AuditTreeHead, HEAD_ID, with_for_update=True)
            if head is None:
                raise AuditError("the audit tree head is missing; run phivault init")
            rows = session.execute(
                select(AuditRecord.seq, *RECORD_COLUMNS)
                .outerjoin(AuditLeaf, AuditLeaf.record_seq == AuditRecord.seq)
                .where(AuditLeaf.record_seq.is_(None))
                .order_by(AuditRecord.seq)
                .limit(limit)
            ).all()
            frontier = Frontier.from_bytes(head.frontier)
            leaves: list[dict[str, object]] = []
            nodes: list[dict[str, object]] = []
            for row in rows:
                seq, fields = row[0], RecordFields._make(row[1:])
                appended = frontier.append(leaf_hash(canonical_bytes(fields)))
                frontier = appended.frontier
                for node in appended.completed:
                    if node.level == 0:
                        leaves.append({"leaf_index": node.index, "record_seq": seq, "leaf_hash": node.hash})
                    else:
                        nodes.append({"level": node.level, "node_index": node.index, "hash": node.hash})
            if leaves:
                session.execute(insert(AuditLeaf), leaves)
            if nodes:
                session.execute(insert(AuditNode), nodes)
            if rows:
                head.size = frontier.size
                head.frontier = frontier.to_bytes()
                head.updated_at = now
            self._maybe_checkpoint(session, frontier, now)
            return len(rows)

    def _maybe_checkpoint(self, session: Session, frontier: Frontier, now: datetime) -> None:
        if frontier.size == 0:
            return
        latest = session.scalars(
            select(AuditCheckpoint).order_by(AuditCheckpoint.size.desc()).limit(1)
        ).first()
        if latest is not None:
            if latest.size >= frontier.size:
                return
            due = (
                frontier.size - latest.size >= self.policy.every_records
                or now - latest.created_at >= self.policy.every
            )
            if not due:
                return
        self._sign(session, frontier, now)

    def _sign(self, session: Session, frontier: Frontier, now: datetime) -> AuditCheckpoint:
        signer = self.signer(session, now)
        root = frontier.root()
        note = sign_checkpoint(
            Checkpoint(signer.origin, frontier.size, root), signer.private_key, signer.origin
        )
        checkpoint = AuditCheckpoint(
            size=frontier.size, root_hash=root, note=note, key_id=signer.key_id, created_at=now
        )
        session.add(checkpoint)
        return checkpoint

    def checkpoint_now(self, now: datetime) -> AuditCheckpoint | None:
        """Integrate everything pending and sign a checkpoint of the result (if it grew)."""
        while self.integrate_pending(now) == INTEGRATE_BATCH:
            pass
        with self.db.transaction() as session:
            head = session.get(AuditTreeHead, HEAD_ID, with_for_update=True)
            if head is None or head.size == 0:
                return None
            latest = session.scalars(
                select(AuditCheckpoint).order_by(AuditCheckpoint.size.desc()).limit(1)
            ).first()
            if latest is not None and latest.size == head.size:
                return latest
            return self._sign(session, Frontier.from_bytes(head.frontier), now)

    # -- retention -----------------------------------------------------------------------

    def prune(self, subject: Subject, *, before: datetime, retention: timedelta, now: datetime) -> int:
        """Delete records older than ``before`` that are already in the tree; return how many.

        ``before`` must lie outside the retention lock (``now - retention``; the database's
        own trigger also refuses anything younger than six months). The leaves and nodes stay,
        so every checkpoint and proof remains verifiable; ``verify`` uses the stored leaf
        hash for a pruned record.
        """
        if before > now - retention:
            raise AuditError(
                f"records younger than the retention lock ({retention.days} days) cannot be pruned"
            )
        with self.db.transaction() as session:
            session.get(AuditTreeHead, HEAD_ID, with_for_update=True)  # one pruner or sequencer at a time
            integrated_and_old = (
                select(AuditRecord.seq)
                .join(AuditLeaf, AuditLeaf.record_seq == AuditRecord.seq)
                .where(AuditRecord.ts < before)
            )
            up_to = session.scalar(select(func.max(integrated_and_old.subquery().c.seq)))
            if up_to is None:
                return 0
            session.add(AuditPruneWindow(id=new_id(), up_to_seq=up_to, created_at=now))
            session.flush()
            deleted = session.execute(
                delete(AuditRecord)
                .where(AuditRecord.seq <= up_to, AuditRecord.seq.in_(integrated_and_old))
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            record(session, AuditAction.AUDIT_PRUNE, subject, None, Outcome.SUCCESS, now=now)
            return int(deleted)

    # -- reading -------------------------------------------------------------------------

    def latest_checkpoint(self) -> AuditCheckpoint | None:
        with self.db.transaction() as session:
            return session.scalars(
                select(AuditCheckpoint).order_by(AuditCheckpoint.size.desc()).limit(1)
            ).first()

    def public_keys(self) -> list[tuple[str, str, Ed25519PublicKey]]:
        """(key id, origin, public key) of every checkpoint key ever used."""
        with self.db.transaction() as session:
            rows = session.execute(
                select(AuditSigningKey.id, AuditSigningKey.origin, AuditSigningKey.public_key)
            ).all()
        return [(key_id, origin, Ed25519PublicKey.from_public_bytes(raw)) for key_id, origin, raw in rows]

    def tree_size(self) -> int:
        with self.db.transaction() as session:
            head = session.get(AuditTreeHead, HEAD_ID)
            return head.size if head else 0

    def inclusion(self, index: int, size: int) -> tuple[bytes, list[bytes]]:
        """The leaf hash at ``index`` and its RFC 9162 inclusion proof in the tree of ``size``."""
        with self.db.read() as session:  # a proof only reads: it need not wait for writers
            self._check_size(session, size)
            if not 0 <= index < size:
                raise ProofError("index must be below size")
            # The leaf and its path in one fetch (one query per table).
            plan = inclusion_proof_plan(index, size)
            leaf_id = NodeId(0, index)
            nodes = DatabaseNodeSource(session).get_nodes([*plan.node_ids, leaf_id])
            if leaf_id not in nodes:
                raise ProofError("the leaf is not stored")
            return nodes[leaf_id], plan.assemble(nodes)

    def consistency(self, old_size: int, new_size: int) -> list[bytes]:
        """The RFC 9162 consistency proof between the trees of ``old_size`` and ``new_size``."""
        with self.db.read() as session:
            self._check_size(session, new_size)
            if not 0 < old_size <= new_size:
                raise ProofError("sizes must satisfy 0 < from <= to")
            return consistency_proof(old_size, new_size, DatabaseNodeSource(session))

    @staticmethod
    def _check_size(session: Session, size: int) -> None:
        head = session.get(AuditTreeHead, HEAD_ID)
        if head is None or not 0 < size <= head.size:
            raise ProofError("size must be between 1 and the current tree size")
