"""``phivault audit verify``: recompute the log from its records and check every claim.

1. every checkpoint's signature, by the key it names, and its stored size and root;
2. the leaves: indexes contiguous from 0, each record present (unless legitimately pruned)
   and hashing to its stored leaf hash;
3. the root recomputed from the records at every checkpoint size equals the signed root;
4. every stored interior node equals the one recomputed from the leaves, and consecutive
   checkpoints are consistent (RFC 9162 §2.1.4.2) with proofs built from the stored nodes;
5. the tree head equals the recomputed tree.

Any changed byte, deleted, inserted or reordered record changes a leaf hash or a root,
and the first affected leaf index is reported.

Speed: rows are read through the DBAPI cursor in primary-key ranges, as plain tuples. On a
large log the leaves are cut into ranges that start on a multiple of a power of two, so the
lower levels of the tree lie inside one range each: worker processes check a range each
(leaves and the subtrees over them) alongside this process, which then hashes and checks the
few levels above. The tree is hashed once: when every record hashes to its stored leaf, the
tree over the stored leaves *is* the tree over the records, and the signed roots are checked
against it.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Select, func, select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection

from phivault.audit.canonical import canonical_bytes
from phivault.audit.checkpoint import NoteVerifier, parse_and_verify
from phivault.audit.errors import AuditError
from phivault.audit.merkle import (
    Frontier,
    NodeId,
    consistency_proof,
    frontier_node_ids,
    leaf_hash,
    leaf_hashes,
    parent_level,
    verify_consistency,
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
from phivault.audit.service import HEAD_ID, RECORD_COLUMNS, DatabaseNodeSource
from phivault.db.engine import Database

CHUNK = 20_000
"""Rows per query: one primary-key range, so memory stays flat and no server-side cursor is needed."""

PARALLEL_FROM_LEAVES = 200_000
"""Below this, starting worker processes costs more than it saves."""

MAX_PROCESSES = 8
"""At most this many processes (this one and its workers) recompute leaves."""


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


def verify_log(db: Database, *, processes: int | None = None) -> VerifyReport:
    """Check the whole log. ``processes`` worker processes check a range of the leaves each,
    besides the one this process checks (``None``: one per other CPU, for a large log).

    A process using this (on the spawn start method) must guard its main module with
    ``if __name__ == "__main__"``, as every multiprocessing program must.
    """
    report = VerifyReport()
    with db.transaction() as session:
        checkpoints = _verified_checkpoints(session, report)
        end = _leaf_bound(session, report)
        workers = default_processes(end) if processes is None else max(0, min(processes, end - 1))
        connection = session.connection().connection
        sizes = [*(size for size, _ in checkpoints if size <= end), end]
        top, ranges = _check_ranges(db, connection, end, workers, sizes)
        leaves = _Leaves.join(ranges)
        # Judged after the leaves were read: a prune that removed a record they miss has
        # committed its window by then (both in one transaction).
        pruned_up_to = session.scalar(select(func.max(AuditPruneWindow.up_to_seq))) or 0
        report.tree_size = leaves.size
        if leaves.size < end:
            report.fail(f"leaf {leaves.size} is missing (leaves deleted or inserted)", leaves.size)
        bad_leaves = _check_leaves(leaves, pruned_up_to, report)
        sizes = [*(size for size, _ in checkpoints if size <= leaves.size), leaves.size]
        stored_tree = _check_stored_tree(connection, db.engine.dialect, leaves, top, sizes, report)
        if leaves.changed:
            # Some record no longer hashes to its stored leaf: hash the tree of the records.
            wanted = {node_id for size in sizes for node_id in frontier_node_ids(size)}
            tree = _KeptNodes(_subtrees(leaves.computed(), 0, 0, wanted, up_to=_WHOLE_TREE)[1])
        else:
            # Every record hashes to its stored leaf, so the stored tree is the records' tree.
            tree = _KeptNodes(stored_tree)
        _check_roots(tree, leaves.size, checkpoints, bad_leaves, report)
        _check_consistency(session, checkpoints, report)
        _check_head(session, tree.frontier(leaves.size), report)
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


def default_processes(leaves: int) -> int:
    """How many worker processes help verify a log of ``leaves`` leaves unless told: one per
    CPU besides this process's own; none for a small log.
    """
    # Linux tells which CPUs this process may use; elsewhere, count them all.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if leaves < PARALLEL_FROM_LEAVES:
        return 0
    return min(MAX_PROCESSES, cpus) - 1


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


def _leaf_bound(session: Session, report: VerifyReport) -> int:
    """One past the highest leaf index: the leaves read are those below it, so leaves
    appended while verifying are left for the next run.
    """
    lowest, highest = session.execute(
        select(func.min(AuditLeaf.leaf_index), func.max(AuditLeaf.leaf_index))
    ).one()
    if lowest is not None and lowest < 0:
        report.fail(f"a leaf was inserted at index {lowest}", 0)
    return 0 if highest is None else highest + 1


# -- the leaves and the subtrees over them, range by range -----------------------------------


@dataclass
class _Range:
    """What checking the leaves ``[start, stop)`` and the subtrees over them found.

    ``stop`` is where the range ended, or its first missing leaf (``gap``). The subtrees are
    those of the stored leaves, up to level ``top``: ``start`` is a multiple of ``2**top``, so
    each of them lies inside one range.
    """

    start: int
    stop: int = 0
    gap: bool = False
    computed: list[bytes] = field(default_factory=list)  # a record that is gone gives its stored leaf
    changed: dict[int, bytes] = field(default_factory=dict)  # leaf: stored hash, where the record differs
    without_record: list[tuple[int, int]] = field(default_factory=list)  # (leaf, record seq)
    records_checked: int = 0
    top_nodes: list[bytes] = field(default_factory=list)  # the range's complete nodes at level ``top``
    kept: dict[NodeId, bytes] = field(default_factory=dict)  # the wanted frontier nodes in the range
    bad_node: _BadNode | None = None  # the range's lowest, leftmost stored node that is wrong


@dataclass(frozen=True, order=True)
class _BadNode:
    """A stored interior node that is not the recomputed one; ordered lowest level first."""

    level: int
    index: int
    missing: bool

    def report(self, report: VerifyReport) -> None:
        state = "is missing" if self.missing else "was altered"
        report.fail(
            f"interior node (level {self.level}, index {self.index}) {state}", self.index << self.level
        )


def _check_ranges(
    db: Database, connection: PoolProxiedConnection, end: int, workers: int, sizes: Sequence[int]
) -> tuple[int, list[_Range]]:
    """Check the leaves ``[0, end)`` in ``workers + 1`` ranges, the first one here; return the
    level up to which the ranges hashed the stored tree, and the ranges.
    """
    dialect = db.engine.dialect
    if not workers:
        return _WHOLE_TREE, [_check_range(connection, dialect, 0, end, _WHOLE_TREE, sizes)]
    # Ranges start on multiples of 2**top; that is at most a quarter of a range, so rounding
    # the bounds down to it keeps the ranges nearly even.
    top = max(0, (end // (workers + 1)).bit_length() - 3)
    bounds = [(end * part // (workers + 1)) >> top << top for part in range(workers + 1)] + [end]
    url = db.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")  # no database connections inherited
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [
            pool.submit(_check_range_in_process, url, start, stop, top, sizes)
            for start, stop in itertools.pairwise(bounds[1:])
        ]
        first = _check_range(connection, dialect, bounds[0], bounds[1], top, sizes)
        return top, [first, *(future.result() for future in futures)]


_WHOLE_TREE = 64  # a level no tree reaches (sizes are uint64)


def _check_range_in_process(url: str, start: int, stop: int, top: int, sizes: Sequence[int]) -> _Range:
    """``_check_range`` in a worker process, on its own connection.

    A raw DBAPI connection: the SQLite engine's transactions begin IMMEDIATE, which would
    wait for the verifying process's own transaction. Each query reads one snapshot of an
    append-only range.
    """
    db = Database(url)
    try:
        connection = db.engine.raw_connection()
        try:
            return _check_range(connection, db.engine.dialect, start, stop, top, sizes)
        finally:
            connection.close()
    finally:
        db.dispose()


def _check_range(
    connection: PoolProxiedConnection,
    dialect: Dialect,
    start: int,
    stop: int,
    top: int,
    sizes: Sequence[int],
) -> _Range:
    """Recompute the leaves ``[start, stop)``, hash the stored tree over them up to level
    ``top``, compare its nodes with the stored ones, and keep its frontier nodes at ``sizes``.
    """
    part = _recompute_leaves(connection, dialect, start, stop)
    stored = part.computed
    if part.changed:
        stored = list(part.computed)
        for index, value in part.changed.items():
            stored[index - start] = value
    wanted = {node_id for size in [*sizes, part.stop] for node_id in frontier_node_ids(size)}

    def compare(level: int, first: int, computed: list[bytes]) -> None:
        if part.bad_node is None:  # the lowest bad node only
            part.bad_node = _compare_stored_nodes(connection, dialect, level, first, computed)

    part.top_nodes, part.kept = _subtrees(stored, 0, start, wanted, up_to=top, on_level=compare)
    return part


def _recompute_leaves(connection: PoolProxiedConnection, dialect: Dialect, start: int, stop: int) -> _Range:
    """Hash the canonical bytes of the records of leaves ``[start, stop)``; compare with the stored leaves."""
    ts_value = _ts_reader(dialect)
    query = (
        select(*RECORD_COLUMNS, AuditLeaf.leaf_index, AuditLeaf.record_seq, AuditLeaf.leaf_hash)
        .outerjoin(AuditRecord, AuditRecord.seq == AuditLeaf.record_seq)
        .order_by(AuditLeaf.leaf_index)
    )
    result = _Range(start, start)
    for low, high in _key_ranges(start, stop):
        rows = _fetch_range(connection, dialect, query, AuditLeaf.leaf_index, low, high)
        present = _contiguous(rows, 12, low)
        del rows[present:]
        if all(row[0] is not None for row in rows):
            hashes = leaf_hashes([canonical_bytes((row[0], ts_value(row[1]), *row[2:12])) for row in rows])
            result.records_checked += len(rows)
        else:
            hashes = []
            for row in rows:
                if row[0] is None:  # the record row is gone: only its stored leaf remains
                    result.without_record.append((row[12], row[13]))
                    hashes.append(row[14])
                else:
                    hashes.append(leaf_hash(canonical_bytes((row[0], ts_value(row[1]), *row[2:12]))))
                    result.records_checked += 1
        if hashes != [row[14] for row in rows]:
            result.changed.update(
                (row[12], row[14]) for row, value in zip(rows, hashes, strict=True) if value != row[14]
            )
        result.computed += hashes
        result.stop = low + present
        if present < high - low:
            result.gap = True
            break
    return result


def _subtrees(
    hashes: list[bytes],
    level: int,
    first: int,
    wanted: Collection[NodeId],
    *,
    up_to: int,
    on_level: Callable[[int, int, list[bytes]], None] | None = None,
) -> tuple[list[bytes], dict[NodeId, bytes]]:
    """Hash the perfect subtrees over ``hashes`` (the complete nodes of ``level`` from index
    ``first`` on, ``first`` a multiple of ``2**(up_to - level)``), each once, up to level
    ``up_to`` or the highest complete node; keep the ``wanted`` nodes met on the way.

    ``on_level(level, first, hashes)`` sees each level above the first. Returns the nodes of
    level ``up_to`` (none if the tree ends lower) and the kept ones.
    """
    kept: dict[NodeId, bytes] = {}
    while True:
        last = first + len(hashes)
        kept.update(
            {
                node: hashes[node.index - first]
                for node in wanted
                if node.level == level and first <= node.index < last
            }
        )
        if level == up_to or (up_to == _WHOLE_TREE and len(hashes) < 2):  # noqa: PLR2004  # a parent needs two
            return (hashes if level == up_to else []), kept
        hashes = parent_level(hashes)
        level += 1
        first >>= 1
        if on_level is not None:
            on_level(level, first, hashes)


def _compare_stored_nodes(
    connection: PoolProxiedConnection, dialect: Dialect, level: int, first: int, computed: list[bytes]
) -> _BadNode | None:
    """The first stored node of ``level`` from index ``first`` on that differs from ``computed``.

    Only the nodes recomputed are read: nodes beyond the tree (appended while verifying) are
    not part of it.
    """
    query = (
        select(AuditNode.node_index, AuditNode.hash)
        .where(AuditNode.level == level)
        .order_by(AuditNode.node_index)
    )
    for low, high in _key_ranges(first, first + len(computed)):
        rows = _fetch_range(connection, dialect, query, AuditNode.node_index, low, high)
        present = _contiguous(rows, 0, low)
        if present == high - low and [value for _, value in rows] == computed[low - first : high - first]:
            continue
        for index, (_, value) in enumerate(rows[:present], start=low):
            if value != computed[index - first]:
                return _BadNode(level, index, missing=False)
        return _BadNode(level, low + present, missing=True)
    return None


# -- putting the ranges together --------------------------------------------------------------


@dataclass
class _Leaves:
    """The ranges joined up to the first missing leaf (``size`` leaves)."""

    size: int
    ranges: list[_Range]  # those that hold leaves below ``size``
    changed: list[int]
    without_record: list[tuple[int, int]]
    records_checked: int

    @classmethod
    def join(cls, ranges: Sequence[_Range]) -> _Leaves:
        size = next((part.stop for part in ranges if part.gap), ranges[-1].stop)
        used = [part for part in ranges if part.start < size or part.start == 0]
        return cls(
            size,
            used,
            sorted(index for part in used for index in part.changed if index < size),
            [(index, seq) for part in used for index, seq in part.without_record if index < size],
            sum(part.records_checked for part in used),
        )

    def computed(self) -> list[bytes]:
        return [value for part in self.ranges for value in part.computed][: self.size]


def _check_stored_tree(
    connection: PoolProxiedConnection,
    dialect: Dialect,
    leaves: _Leaves,
    top: int,
    sizes: Sequence[int],
    report: VerifyReport,
) -> dict[NodeId, bytes]:
    """Report the lowest, leftmost stored interior node that differs from the tree over the
    stored leaves; return that tree's frontier nodes at ``sizes``.

    Proofs are served from these nodes, so a rewritten node would give auditors false
    proofs even where no checkpoint covers it yet. The ranges checked the levels up to
    ``top``; the levels above are hashed and checked here.
    """
    wanted = {node_id for size in sizes for node_id in frontier_node_ids(size)}
    kept = {node: value for part in leaves.ranges for node, value in part.kept.items() if node in wanted}
    bad = sorted(part.bad_node for part in leaves.ranges if part.bad_node is not None)

    def compare(level: int, first: int, computed: list[bytes]) -> None:
        if not bad:  # levels above a bad node are not compared: one report is enough
            bad.extend(filter(None, [_compare_stored_nodes(connection, dialect, level, first, computed)]))

    if top != _WHOLE_TREE:
        top_nodes = [value for part in leaves.ranges for value in part.top_nodes][: leaves.size >> top]
        kept.update(_subtrees(top_nodes, top, 0, wanted, up_to=_WHOLE_TREE, on_level=compare)[1])
    if bad:
        bad[0].report(report)
    return kept


class _KeptNodes:
    """A ``NodeSource`` over the nodes ``_frontier_nodes`` kept."""

    def __init__(self, nodes: Mapping[NodeId, bytes]) -> None:
        self.nodes = nodes

    def get_nodes(self, ids: Sequence[NodeId]) -> Mapping[NodeId, bytes]:
        return {node_id: self.nodes[node_id] for node_id in ids if node_id in self.nodes}

    def frontier(self, size: int) -> Frontier | None:
        try:
            return Frontier.load(size, self)
        except AuditError:  # a malformed stored leaf hash of a pruned record
            return None


# -- putting it together ------------------------------------------------------------------


def _check_leaves(leaves: _Leaves, pruned_up_to: int, report: VerifyReport) -> list[int]:
    """Report the records that changed, or are gone without a prune; return their leaves."""
    report.records_checked = leaves.records_checked
    for index in leaves.changed:
        report.fail(f"the record of leaf {index} was changed", index)
    deleted = [index for index, seq in leaves.without_record if seq > pruned_up_to]
    for index in deleted:
        report.fail(f"the record of leaf {index} was deleted", index)
    return sorted([*leaves.changed, *deleted])


def _check_roots(
    tree: _KeptNodes,
    size: int,
    checkpoints: list[tuple[int, bytes]],
    bad_leaves: list[int],
    report: VerifyReport,
) -> None:
    segment_start = 0  # first leaf not covered by the previous checkpoint
    for checkpoint_size, signed_root in checkpoints:
        if checkpoint_size > size:
            report.fail(
                f"checkpoint at size {checkpoint_size} covers leaves that are missing",
                min(checkpoint_size - 1, size),
            )
            continue
        frontier = tree.frontier(checkpoint_size)
        if frontier is None or frontier.root() != signed_root:
            # Without a changed leaf to blame, the change lies somewhere in the leaves this
            # checkpoint added (stored leaf hashes rewritten to match).
            blamed = any(segment_start <= index < checkpoint_size for index in bad_leaves)
            report.fail(
                f"the tree of size {checkpoint_size} does not match its signed checkpoint",
                None if blamed else segment_start,
            )
        segment_start = checkpoint_size


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


def _check_head(session: Session, recomputed: Frontier | None, report: VerifyReport) -> None:
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


# -- reading rows -------------------------------------------------------------------------


def _fetch_range(
    connection: PoolProxiedConnection,
    dialect: Dialect,
    query: Select[*tuple[Any, ...]],
    key: Any,  # noqa: ANN401  # an integer primary-key column
    low: int,
    high: int,
) -> list[tuple[Any, ...]]:
    """The rows of ``query`` with ``low <= key < high``, as the DBAPI returns them.

    The bounds are integers computed here, so they are rendered into the SQL.
    """
    statement = query.where(key >= low, key < high).compile(
        dialect=dialect, compile_kwargs={"literal_binds": True}
    )
    cursor = connection.cursor()
    try:
        cursor.execute(str(statement))
        return list(cursor.fetchall())
    except dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(str(statement), None, exc, dialect.loaded_dbapi.Error) from exc
    finally:
        cursor.close()


def _contiguous(rows: Sequence[Sequence[Any]], column: int, start: int) -> int:
    """How many of ``rows`` (ordered by a unique key in ``column``) number ``start, start + 1, …``."""
    if not rows or rows[0][column] != start:
        return 0
    if rows[-1][column] == start + len(rows) - 1:  # unique and ordered: no room for a gap
        return len(rows)
    return next(i for i, row in enumerate(rows) if row[column] != start + i)


def _ts_reader(dialect: Dialect) -> Callable[[Any], datetime | str]:
    """Turns a raw ``audit_records.ts`` value of ``dialect`` into what ``canonical_bytes``
    takes: the ``datetime`` SQLAlchemy would return (what the sequencer hashed), or straight
    away the canonical text where the database holds the time as text.

    A value that is no time at all (written into the database by hand) becomes text that
    no record hashed, so its leaf is reported as changed instead of stopping the check.
    """
    processor = AuditRecord.ts.type.dialect_impl(dialect).result_processor(dialect, None)
    convert: Callable[[Any], datetime] = processor if processor is not None else _identity
    on_sqlite = dialect.name == "sqlite"

    def read(raw: Any) -> datetime | str:  # noqa: ANN401
        # SQLAlchemy stores a UTC time on SQLite as "YYYY-MM-DD HH:MM:SS.ffffff" (its
        # DATETIME storage format): the canonical text is the same digits with "T" and "Z".
        # Parsing it was most of the cost of hashing a record. Any other shape is parsed.
        if on_sqlite and isinstance(raw, str) and _SQLITE_TS(raw):
            return f"{raw[:10]}T{raw[11:]}Z"
        try:
            return convert(raw)
        except (TypeError, ValueError):
            return f"not a time: {json.encoder.encode_basestring(repr(raw))[1:-1]}"

    return read


_SQLITE_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}").fullmatch


def _identity(value: Any) -> Any:  # noqa: ANN401
    return value


def _key_ranges(start: int, stop: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` cut into ranges of at most ``CHUNK`` keys."""
    for low in range(start, stop, CHUNK):
        yield low, min(low + CHUNK, stop)
