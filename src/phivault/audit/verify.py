"""``phivault audit verify``: recompute the log from its records and check every claim.

1. every checkpoint's signature, by the key it names, and its stored size and root;
2. the leaves: indexes contiguous from 0, each record present (unless legitimately pruned)
   and hashing to its stored leaf hash;
3. the root recomputed from the records at every checkpoint size equals the signed root;
4. consecutive checkpoints are consistent (RFC 9162 §2.1.4.2), with proofs built from the
   stored nodes, so tampered interior nodes are caught too;
5. the tree head equals the recomputed tree.

Any changed byte, deleted, inserted or reordered record changes a leaf hash or a root,
and the first affected leaf index is reported.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from phivault.audit.canonical import canonical_bytes
from phivault.audit.checkpoint import NoteVerifier, parse_and_verify
from phivault.audit.errors import AuditError
from phivault.audit.merkle import Frontier, consistency_proof, leaf_hash, node_hash, verify_consistency
from phivault.audit.models import (
    AuditCheckpoint,
    AuditLeaf,
    AuditNode,
    AuditPruneWindow,
    AuditRecord,
    AuditSigningKey,
    AuditTreeHead,
)
from phivault.audit.service import HEAD_ID, RECORD_COLUMNS, DatabaseNodeSource
from phivault.db.engine import Database

BATCH = 20_000


@dataclass
class VerifyReport:
    ok: bool = True
    tree_size: int = 0
    records_checked: int = 0
    checkpoints_checked: int = 0
    pending_records: int = 0
    first_bad_index: int | None = None
    problems: list[str] = field(default_factory=list)
    verified_at: datetime | None = None

    def fail(self, problem: str, index: int | None = None) -> None:
        self.ok = False
        self.problems.append(problem)
        if index is not None and (self.first_bad_index is None or index < self.first_bad_index):
            self.first_bad_index = index


def verify_log(db: Database) -> VerifyReport:
    report = VerifyReport()
    with db.transaction() as session:
        checkpoints = _verified_checkpoints(session, report)
        leaf_hashes: list[bytes] = []
        recomputed = _recompute(session, checkpoints, report, leaf_hashes)
        _check_nodes(session, leaf_hashes, report)
        _check_consistency(session, checkpoints, report)
        _check_head(session, recomputed, report)
        report.pending_records = (
            session.scalar(
                select(func.count())
                .select_from(AuditRecord)
                .outerjoin(AuditLeaf, AuditLeaf.record_seq == AuditRecord.seq)
                .where(AuditLeaf.record_seq.is_(None))
            )
            or 0
        )
    return report


def _verified_checkpoints(session: Session, report: VerifyReport) -> list[tuple[int, bytes]]:
    """(size, root) of every checkpoint whose signature and stored fields check out."""
    keys = {
        key_id: NoteVerifier(origin, Ed25519PublicKey.from_public_bytes(raw))
        for key_id, origin, raw in session.execute(
            select(AuditSigningKey.id, AuditSigningKey.origin, AuditSigningKey.public_key)
        )
    }
    good: list[tuple[int, bytes]] = []
    for row in session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.size)):
        verifier = keys.get(row.key_id)
        if verifier is None:
            report.fail(f"checkpoint at size {row.size} names an unknown key")
            continue
        try:
            checkpoint = parse_and_verify(row.note, verifier)
        except AuditError:
            report.fail(f"checkpoint at size {row.size} has a bad signature or format")
            continue
        if checkpoint.size != row.size or checkpoint.root_hash != row.root_hash:
            report.fail(f"checkpoint at size {row.size}: stored size or root differs from the signed one")
            continue
        good.append((checkpoint.size, checkpoint.root_hash))
        report.checkpoints_checked += 1
    return good


def _recompute(
    session: Session, checkpoints: list[tuple[int, bytes]], report: VerifyReport, leaf_hashes: list[bytes]
) -> Frontier:
    pruned_up_to = session.scalar(select(func.max(AuditPruneWindow.up_to_seq))) or 0
    signed_roots = dict(checkpoints)
    boundaries = sorted(signed_roots)
    frontier = Frontier()
    pending: list[bytes] = []
    expected = 0
    next_boundary = 0
    segment_start = 0  # first leaf not covered by the previous checkpoint
    leaf_problem_in_segment = False
    # Core rows, not ORM ones: a million records make per-row ORM overhead the bottleneck.
    result = session.connection().execute(
        select(*RECORD_COLUMNS, AuditLeaf.leaf_index, AuditLeaf.record_seq, AuditLeaf.leaf_hash)
        .outerjoin(AuditRecord, AuditRecord.seq == AuditLeaf.record_seq)
        .order_by(AuditLeaf.leaf_index)
        .execution_options(yield_per=BATCH)
    )
    try:
        for row in result:
            index, seq, stored = row[12], row[13], row[14]
            if index != expected:
                report.fail(f"leaf {expected} is missing (leaves deleted or inserted)", expected)
                break
            expected += 1
            if row[0] is None:  # the record row is gone
                if seq > pruned_up_to:
                    report.fail(f"the record of leaf {index} was deleted", index)
                    leaf_problem_in_segment = True
                computed = stored
            else:
                computed = leaf_hash(canonical_bytes(row))
                if computed != stored:
                    report.fail(f"the record of leaf {index} was changed", index)
                    leaf_problem_in_segment = True
                report.records_checked += 1
            pending.append(computed)
            leaf_hashes.append(stored)  # nodes are checked against the stored leaves
            while next_boundary < len(boundaries) and expected == boundaries[next_boundary]:
                frontier = frontier.extend(pending)
                pending.clear()
                size = boundaries[next_boundary]
                if frontier.root() != signed_roots[size]:
                    # Without a changed leaf to blame, the change lies somewhere in the leaves
                    # this checkpoint added (stored leaf hashes rewritten to match).
                    blame = None if leaf_problem_in_segment else segment_start
                    report.fail(f"the tree of size {size} does not match its signed checkpoint", blame)
                next_boundary += 1
                segment_start = size
                leaf_problem_in_segment = False
    finally:
        result.close()
    frontier = frontier.extend(pending)
    for size in boundaries[next_boundary:]:
        report.fail(f"checkpoint at size {size} covers leaves that are missing", min(size - 1, expected))
    report.tree_size = frontier.size
    return frontier


def _check_nodes(session: Session, leaf_hashes: list[bytes], report: VerifyReport) -> None:
    """Every stored interior node equals the one recomputed from the stored leaves.

    (The leaves themselves are checked against the records in ``_recompute``.)

    Proofs are served from these nodes, so a rewritten node would give auditors false
    proofs even where no checkpoint covers it yet.
    """
    level_hashes = leaf_hashes
    level = 1
    while len(level_hashes) >= 2:  # noqa: PLR2004  # a parent needs two children
        parents = [
            node_hash(level_hashes[i], level_hashes[i + 1]) for i in range(0, len(level_hashes) - 1, 2)
        ]
        stored = session.connection().execute(
            select(AuditNode.node_index, AuditNode.hash)
            .where(AuditNode.level == level)
            .order_by(AuditNode.node_index)
            .execution_options(yield_per=BATCH)
        )
        try:
            count = 0
            for node_index, value in stored:
                if node_index != count or count >= len(parents) or value != parents[count]:
                    report.fail(f"interior node (level {level}, index {count}) was altered", count << level)
                    return
                count += 1
            if count != len(parents):
                report.fail(f"interior node (level {level}, index {count}) is missing", count << level)
                return
        finally:
            stored.close()
        level_hashes = parents
        level += 1


def _check_consistency(session: Session, checkpoints: list[tuple[int, bytes]], report: VerifyReport) -> None:
    source = DatabaseNodeSource(session)
    for (old_size, old_root), (new_size, new_root) in itertools.pairwise(checkpoints):
        try:
            proof = consistency_proof(old_size, new_size, source)
            verify_consistency(old_size, new_size, old_root, new_root, proof)
        except AuditError:
            # Blame the first new leaf only if nothing more precise was found already.
            blame = old_size if report.first_bad_index is None else None
            report.fail(
                f"checkpoints {old_size} and {new_size} are not consistent (stored nodes altered)", blame
            )


def _check_head(session: Session, recomputed: Frontier, report: VerifyReport) -> None:
    head = session.get(AuditTreeHead, HEAD_ID)
    if head is None:
        report.fail("the tree head is missing")
        return
    try:
        stored = Frontier.from_bytes(head.frontier)
    except AuditError:
        report.fail("the tree head is malformed")
        return
    if stored.size != head.size or stored != recomputed:
        report.fail(f"the tree head (size {head.size}) differs from the tree recomputed from the records")
