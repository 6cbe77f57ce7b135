"""The Merkle tree of the audit log, as RFC 9162 (Certificate Transparency 2.0) §2.1 defines it.

Terms used throughout:

* *leaf hash*: ``HASH(0x00 || record)`` (§2.1.1); a record is one canonical JSON audit entry.
* *node* ``(level, index)``: the root of the perfect subtree over the leaves
  ``[index * 2**level, (index + 1) * 2**level)``; level 0 nodes are the leaf hashes. A node
  *exists* at tree size ``n`` once ``(index + 1) * 2**level <= n``, and from then on its hash
  never changes, so it can be stored once and read forever.
* *frontier*: the perfect subtrees that cover ``[0, n)``, largest first, one per set bit of
  ``n`` (so at most 64 hashes). It is all a writer needs to append a leaf and to compute the
  root; it never rereads old leaves.

Proofs are made from stored nodes in two steps, so a database answers each proof with a single
query: a :class:`ProofPlan` names the nodes a proof needs, then assembles the proof from the
hashes a :class:`NodeSource` returns for them. Proof elements that are not perfect subtrees
(the right edge of a tree whose size is not a power of two) are folded from the at most
``log2 n`` stored nodes that cover them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from phivault.audit.errors import NodeSourceError, ProofError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "EMPTY_TREE_ROOT",
    "HASH_SIZE",
    "MAX_TREE_SIZE",
    "Appended",
    "Frontier",
    "InMemoryNodeSource",
    "Node",
    "NodeId",
    "NodeSource",
    "ProofPlan",
    "consistency_proof",
    "consistency_proof_plan",
    "frontier_node_ids",
    "inclusion_proof",
    "inclusion_proof_plan",
    "leaf_hash",
    "leaf_hashes",
    "node_hash",
    "parent_level",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
"""Bytes in a SHA-256 hash, the only hash phivault's tree uses."""

MAX_TREE_SIZE = 2**64 - 1
"""Tree sizes are uint64 in RFC 9162 (``TreeHeadDataV2.tree_size``) and in checkpoint tooling."""

# RFC 9162 §2.1.1: the 0x00 / 0x01 prefixes separate leaves from interior nodes, which is what
# gives the tree its second-preimage resistance.
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

# A serialised frontier starts with the tree size as a uint64.
_SIZE_BYTES = 8

EMPTY_TREE_ROOT = hashlib.sha256(b"").digest()
"""RFC 9162 §2.1.1: the hash of an empty list is the hash of an empty string, MTH({}) = HASH()."""


@dataclass(frozen=True, slots=True)
class NodeId:
    """The position of a perfect subtree: ``level`` 0 is a leaf, ``index`` counts from the left."""

    level: int
    index: int

    def exists_at(self, size: int) -> bool:
        """Whether this subtree is complete in a tree of ``size`` leaves."""
        return (self.index + 1) << self.level <= size


@dataclass(frozen=True, slots=True)
class Node:
    """A perfect subtree and its hash, as the caller stores it in its node table."""

    level: int
    index: int
    hash: bytes

    @property
    def id(self) -> NodeId:
        return NodeId(self.level, self.index)


class NodeSource(Protocol):
    """Where proofs read stored node hashes from (a database table, or memory)."""

    def get_nodes(self, ids: Sequence[NodeId]) -> Mapping[NodeId, bytes]:
        """Return the stored hash of each requested perfect subtree, keyed by its id.

        Called once per proof with every id the proof needs, so an implementation can answer
        with one query. Key the answer by ``NodeId`` (it compares by value, not as a tuple);
        ids with no stored node may simply be left out.
        """
        ...


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 §2.1.1: MTH({d(0)}) = HASH(0x00 || d(0))."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def leaf_hashes(entries: Iterable[bytes]) -> list[bytes]:
    """``leaf_hash`` of many entries in one call: the fast path for verifying a whole log."""
    sha256 = hashlib.sha256
    prefix = _LEAF_PREFIX
    return [sha256(prefix + entry).digest() for entry in entries]


def parent_level(hashes: Sequence[bytes]) -> list[bytes]:
    """The perfect subtrees one level up from ``hashes`` (the complete nodes of one level,
    leftmost first): ``HASH(0x01 || left || right)`` for each pair (RFC 9162 §2.1.1). A last,
    unpaired hash has no parent yet. The caller vouches for the hashes (32 bytes each).
    """
    sha256 = hashlib.sha256
    prefix = _NODE_PREFIX
    pairs = iter(hashes)
    return [sha256(prefix + left + right).digest() for left, right in zip(pairs, pairs, strict=False)]


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1: MTH(D[n]) = HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n]))."""
    _check_hash(left, "left hash")
    _check_hash(right, "right hash")
    return _hash_children(left, right)


def _hash_children(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise ProofError(f"{what} must be a {HASH_SIZE}-byte SHA-256 hash")


def _check_size(size: int, what: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_TREE_SIZE:
        raise ProofError(f"{what} must be an integer from 0 to 2**64 - 1")


def _check_proof(proof: Sequence[bytes], longest: int) -> None:
    # Refuse an overlong proof before hashing anything: hostile input gets no work done.
    if len(proof) > longest:
        raise ProofError(f"a proof for this tree size has at most {longest} hashes")
    for element in proof:
        _check_hash(element, "proof hash")


def _largest_power_of_two_below(n: int) -> int:
    """RFC 9162 §2.1.1: "k is the largest power of two smaller than n" (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def frontier_node_ids(size: int) -> tuple[NodeId, ...]:
    """The perfect subtrees whose roots make up the frontier of ``size`` leaves, largest first."""
    _check_size(size, "tree size")
    return _covering_nodes(0, size)


def _covering_nodes(start: int, end: int) -> tuple[NodeId, ...]:
    """List the perfect subtrees covering the leaves [start, end), largest first.

    Only called for the ranges the RFC's recursion produces, which start on a multiple of the
    smallest power of two >= their width; their MTH is then the right fold of these nodes
    (the RFC splits off the largest power of two on the left at every step).
    """
    ids: list[NodeId] = []
    while start < end:
        level = (end - start).bit_length() - 1
        ids.append(NodeId(level, start >> level))
        start += 1 << level
    return tuple(ids)


def _fold(hashes: Sequence[bytes]) -> bytes:
    """MTH of consecutive perfect subtrees given largest first (see ``_covering_nodes``)."""
    root = hashes[-1]
    for left in reversed(hashes[:-1]):
        root = _hash_children(left, root)
    return root


class Appended(NamedTuple):
    """The result of appending one leaf: the new frontier, and the nodes that became complete.

    ``completed`` holds the leaf itself (level 0) and every perfect subtree the leaf
    completed, lowest first; storing them all is what lets proofs be made from stored nodes.
    """

    frontier: Frontier
    completed: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Frontier:
    """The roots of the perfect subtrees covering the leaves [0, size), largest first.

    A small immutable value: the audit service keeps the latest one (``to_bytes``) next to the
    log, appends with :meth:`append`, and signs :meth:`root` in checkpoints.
    """

    size: int = 0
    hashes: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _check_size(self.size, "tree size")
        if len(self.hashes) != self.size.bit_count():
            raise ProofError("a frontier has one hash per set bit of the tree size")
        for value in self.hashes:
            _check_hash(value, "frontier hash")

    @property
    def node_ids(self) -> tuple[NodeId, ...]:
        """Which perfect subtrees ``hashes`` are, largest first."""
        return _covering_nodes(0, self.size)

    def root(self) -> bytes:
        """RFC 9162 §2.1.1 MTH of the tree's leaves, from the frontier alone."""
        if not self.hashes:
            return EMPTY_TREE_ROOT
        return _fold(self.hashes)

    def append(self, leaf_hash: bytes) -> Appended:
        """Add one leaf; report the new frontier and the nodes the leaf completed."""
        _check_hash(leaf_hash, "leaf hash")
        if self.size == MAX_TREE_SIZE:
            raise ProofError("the tree is full")
        index = self.size
        level = 0
        carry = leaf_hash
        completed = [Node(0, index, leaf_hash)]
        hashes = list(self.hashes)
        # Binary increment: every trailing 1 bit of the size is a subtree as wide as `carry`
        # that is its left sibling; merging the two completes their parent.
        while index & 1:
            carry = _hash_children(hashes.pop(), carry)
            level += 1
            index >>= 1
            completed.append(Node(level, index, carry))
        hashes.append(carry)
        return Appended(Frontier(self.size + 1, tuple(hashes)), tuple(completed))

    def extend(self, leaf_hashes: Iterable[bytes]) -> Frontier:
        """Append many leaves without reporting nodes: the fast path for verifying a whole log.

        Hashes each interior node once (n - 1 node hashes for n leaves) and keeps nothing
        but the frontier, so memory stays constant however long the log is.
        """
        sha256 = hashlib.sha256
        prefix = _NODE_PREFIX
        stack = list(self.hashes)
        push = stack.append
        pop = stack.pop
        size = self.size
        for value in leaf_hashes:
            if value.__class__ is not bytes or len(value) != HASH_SIZE:
                raise ProofError(f"leaf hash {size} must be a {HASH_SIZE}-byte SHA-256 hash")
            size += 1
            carry = value
            bits = size
            while not bits & 1:
                carry = sha256(prefix + pop() + carry).digest()
                bits >>= 1
            push(carry)
        return Frontier(size, tuple(stack))

    @classmethod
    def load(cls, size: int, source: NodeSource) -> Frontier:
        """Read the frontier of the tree of ``size`` leaves from stored nodes, in one fetch."""
        ids = frontier_node_ids(size)
        nodes = source.get_nodes(ids) if ids else {}
        return cls(size, tuple(_stored(nodes, node_id) for node_id in ids))

    def to_bytes(self) -> bytes:
        """Serialise as the size (8 bytes, big-endian) followed by the hashes."""
        return self.size.to_bytes(_SIZE_BYTES, "big") + b"".join(self.hashes)

    @classmethod
    def from_bytes(cls, data: bytes) -> Frontier:
        """Parse what :meth:`to_bytes` produced; refuse anything else."""
        if len(data) < _SIZE_BYTES:
            raise ProofError("a serialised frontier starts with an 8-byte size")
        size = int.from_bytes(data[:_SIZE_BYTES], "big")
        if len(data) != _SIZE_BYTES + HASH_SIZE * size.bit_count():
            raise ProofError("a serialised frontier has one hash per set bit of its size")
        hashes = tuple(
            bytes(data[offset : offset + HASH_SIZE]) for offset in range(_SIZE_BYTES, len(data), HASH_SIZE)
        )
        return cls(size, hashes)


def root_from_leaf_hashes(leaf_hashes: Iterable[bytes]) -> bytes:
    """RFC 9162 §2.1.1 MTH of a stream of leaf hashes, in constant memory."""
    return Frontier().extend(leaf_hashes).root()


def _stored(nodes: Mapping[NodeId, bytes], node_id: NodeId) -> bytes:
    value = nodes.get(node_id)
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise NodeSourceError(
            f"no stored {HASH_SIZE}-byte hash for node (level {node_id.level}, index {node_id.index})"
        )
    return value


@dataclass(frozen=True, slots=True)
class ProofPlan:
    """The stored nodes a proof needs, and how they make up the proof.

    ``elements`` has one entry per proof hash, in proof order: the perfect subtrees whose
    right fold is that hash (a single node unless the element is the tree's ragged right
    edge).
    """

    elements: tuple[tuple[NodeId, ...], ...]

    @property
    def node_ids(self) -> tuple[NodeId, ...]:
        """Every node to fetch, each once: the argument for a single ``get_nodes`` call."""
        return tuple(dict.fromkeys(node_id for element in self.elements for node_id in element))

    def assemble(self, nodes: Mapping[NodeId, bytes]) -> list[bytes]:
        """Build the proof from the fetched node hashes."""
        return [_fold([_stored(nodes, node_id) for node_id in element]) for element in self.elements]

    def fetch_and_assemble(self, source: NodeSource) -> list[bytes]:
        """Fetch the nodes in one call and build the proof."""
        if not self.elements:
            return []
        return self.assemble(source.get_nodes(self.node_ids))


def inclusion_proof_plan(index: int, size: int) -> ProofPlan:
    """RFC 9162 §2.1.3.1: the nodes of PATH(index, D[size])."""
    _check_size(size, "tree size")
    _check_size(index, "leaf index")
    if index >= size:
        raise ProofError("the leaf index must be less than the tree size")
    elements: list[tuple[NodeId, ...]] = []
    start, end = 0, size
    # PATH(0, {d(0)}) = {}; for n > 1, with k the largest power of two smaller than n:
    while end - start > 1:
        k = _largest_power_of_two_below(end - start)
        if index < start + k:
            # PATH(m, D[n]) = PATH(m, D[0:k]) : MTH(D[k:n])  for m < k
            elements.append(_covering_nodes(start + k, end))
            end = start + k
        else:
            # PATH(m, D[n]) = PATH(m - k, D[k:n]) : MTH(D[0:k])  for m >= k
            elements.append(_covering_nodes(start, start + k))
            start += k
    # The descent met the siblings root first; PATH lists them leaf first.
    elements.reverse()
    return ProofPlan(tuple(elements))


def consistency_proof_plan(old_size: int, new_size: int) -> ProofPlan:
    """RFC 9162 §2.1.4.1: the nodes of PROOF(old_size, D[new_size]).

    Defined for 0 < old_size <= new_size; equal sizes give the empty proof.
    """
    _check_size(old_size, "old tree size")
    _check_size(new_size, "new tree size")
    if old_size > new_size:
        raise ProofError("the old tree size must not exceed the new tree size")
    if old_size == 0:
        raise ProofError("RFC 9162 §2.1.4.1 defines consistency proofs only from a non-empty tree")
    m = old_size
    elements: list[tuple[NodeId, ...]] = []
    start, end = 0, new_size
    # PROOF(m, D[n]) = SUBPROOF(m, D[n], true); `known` is the RFC's flag b.
    known = True
    # SUBPROOF(m, D[m], true) = {}, so the loop stops once the subtree is D[0:m] itself.
    while m != end:
        k = _largest_power_of_two_below(end - start)
        if m - start <= k:
            # SUBPROOF(m, D[n], b) = SUBPROOF(m, D[0:k], b) : MTH(D[k:n])  for m <= k
            elements.append(_covering_nodes(start + k, end))
            end = start + k
        else:
            # SUBPROOF(m, D[n], b) = SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])  for m > k
            elements.append(_covering_nodes(start, start + k))
            start += k
            known = False
    if not known:
        # SUBPROOF(m, D[m], false) = {MTH(D[m])}
        elements.append(_covering_nodes(start, end))
    elements.reverse()
    return ProofPlan(tuple(elements))


def inclusion_proof(index: int, size: int, source: NodeSource) -> list[bytes]:
    """RFC 9162 §2.1.3.1 inclusion proof of leaf ``index`` in the tree of ``size`` leaves."""
    return inclusion_proof_plan(index, size).fetch_and_assemble(source)


def consistency_proof(old_size: int, new_size: int, source: NodeSource) -> list[bytes]:
    """RFC 9162 §2.1.4.1 consistency proof between the trees of ``old_size`` and ``new_size``."""
    return consistency_proof_plan(old_size, new_size).fetch_and_assemble(source)


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 §2.1.3.2: raise :class:`ProofError` unless ``proof`` shows the leaf is in the tree."""
    _check_hash(leaf_hash, "leaf hash")
    _check_hash(root, "root hash")
    _check_size(size, "tree size")
    _check_size(index, "leaf index")
    # An audit path has one hash per level below the root, ceil(log2(size)) at most.
    _check_proof(proof, (size - 1).bit_length() if size else 0)
    # 1. If leaf_index >= tree_size, stop and fail the proof verification.
    if index >= size:
        raise ProofError("the leaf index must be less than the tree size")
    # 2. Set fn to leaf_index and sn to tree_size - 1.
    fn, sn = index, size - 1
    # 3. Set r to hash.
    r = leaf_hash
    # 4. For each value p in the inclusion_path array:
    for p in proof:
        # a. If sn is 0, then stop the iteration and fail the proof verification.
        if sn == 0:
            raise ProofError("the inclusion proof is longer than the path to the root")
        # b. If LSB(fn) is set, or if fn is equal to sn, then:
        if fn & 1 or fn == sn:
            # i. Set r to HASH(0x01 || p || r).
            r = _hash_children(p, r)
            # ii. If LSB(fn) is not set, then right-shift both fn and sn equally until
            #     either LSB(fn) is set or fn is 0.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        # Otherwise: Set r to HASH(0x01 || r || p).
        else:
            r = _hash_children(r, p)
        # c. Finally, right-shift both fn and sn one time.
        fn >>= 1
        sn >>= 1
    # 5. Compare sn to 0. Compare r against the root_hash. If sn is equal to 0 and r and the
    #    root_hash are equal, then the log has proven the inclusion of hash.
    if sn != 0:
        raise ProofError("the inclusion proof is shorter than the path to the root")
    if r != root:
        raise ProofError("the inclusion proof does not lead to the root hash")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2: raise :class:`ProofError` unless the new tree extends the old one."""
    _check_hash(old_root, "old root hash")
    _check_hash(new_root, "new root hash")
    _check_size(old_size, "old tree size")
    _check_size(new_size, "new tree size")
    # At most one hash per level below the new root, plus the old tree's own subtree hash.
    _check_proof(proof, (new_size - 1).bit_length() + 1 if new_size else 0)
    if old_size > new_size:
        raise ProofError("the old tree size must not exceed the new tree size")
    if old_size == 0:
        # §2.1.4.1 defines PROOF(m, D[n]) for 0 < m; a proof from the empty tree proves nothing.
        raise ProofError("RFC 9162 §2.1.4.1 defines consistency proofs only from a non-empty tree")
    if old_size == new_size:
        # §2.1.4.1: PROOF(n, D[n]) = SUBPROOF(n, D[n], true) = {}; the two heads must be equal.
        if proof:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError("the two roots of the same tree size differ")
        return
    _verify_consistency_path(old_size, new_size, old_root, new_root, list(proof))


def _verify_consistency_path(  # noqa: C901 - transcribes RFC 9162 §2.1.4.2 step by step
    first: int, second: int, first_hash: bytes, second_hash: bytes, consistency_path: list[bytes]
) -> None:
    """RFC 9162 §2.1.4.2 steps 1 to 7, in the RFC's names, for 0 < first < second."""
    # 1. If consistency_path is an empty array, stop and fail the proof verification.
    if not consistency_path:
        raise ProofError("the consistency proof is empty")
    # 2. If first is an exact power of 2, then prepend first_hash to the consistency_path array.
    if first & (first - 1) == 0:
        consistency_path.insert(0, first_hash)
    # 3. Set fn to first - 1 and sn to second - 1.
    fn, sn = first - 1, second - 1
    # 4. If LSB(fn) is set, then right-shift both fn and sn equally until LSB(fn) is not set.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5. Set both fr and sr to the first value in the consistency_path array.
    fr = sr = consistency_path[0]
    # 6. For each subsequent value c in the consistency_path array:
    for c in consistency_path[1:]:
        # a. If sn is 0, then stop the iteration and fail the proof verification.
        if sn == 0:
            raise ProofError("the consistency proof is longer than the path to the root")
        # b. If LSB(fn) is set, or if fn is equal to sn, then:
        if fn & 1 or fn == sn:
            # i. Set fr to HASH(0x01 || c || fr). Set sr to HASH(0x01 || c || sr).
            fr = _hash_children(c, fr)
            sr = _hash_children(c, sr)
            # ii. If LSB(fn) is not set, then right-shift both fn and sn equally until
            #     either LSB(fn) is set or fn is 0.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        # Otherwise: Set sr to HASH(0x01 || sr || c).
        else:
            sr = _hash_children(sr, c)
        # c. Finally, right-shift both fn and sn one time.
        fn >>= 1
        sn >>= 1
    # 7. Verify that the fr calculated is equal to the first_hash supplied, that the sr
    #    calculated is equal to the second_hash supplied, and that sn is 0.
    if sn != 0:
        raise ProofError("the consistency proof is shorter than the path to the root")
    if fr != first_hash:
        raise ProofError("the consistency proof does not lead to the old root hash")
    if sr != second_hash:
        raise ProofError("the consistency proof does not lead to the new root hash")


class InMemoryNodeSource:
    """Every perfect subtree of one tree, one list per level; for tests and offline verification.

    Build it from all leaf hashes (:meth:`from_leaf_hashes`) or node by node from what
    :meth:`Frontier.append` reports (:meth:`add`), exactly as a database table would be filled.
    """

    def __init__(self) -> None:
        self._levels: list[list[bytes]] = []

    @classmethod
    def from_leaf_hashes(cls, leaf_hashes: Iterable[bytes]) -> InMemoryNodeSource:
        level = list(leaf_hashes)
        for value in level:
            _check_hash(value, "leaf hash")
        source = cls()
        source._levels.append(level)
        while len(level) > 1:
            level = parent_level(level)
            source._levels.append(level)
        return source

    @property
    def size(self) -> int:
        """How many leaves the source holds."""
        return len(self._levels[0]) if self._levels else 0

    def add(self, node: Node) -> None:
        """Store one completed node; nodes of a level must arrive in index order."""
        _check_hash(node.hash, "node hash")
        while len(self._levels) <= node.level:
            self._levels.append([])
        row = self._levels[node.level]
        if node.index != len(row):
            raise ProofError("nodes must be added in the order the tree completes them")
        row.append(node.hash)

    def get_nodes(self, ids: Sequence[NodeId]) -> Mapping[NodeId, bytes]:
        found: dict[NodeId, bytes] = {}
        for node_id in ids:
            level, index = node_id.level, node_id.index
            if 0 <= level < len(self._levels) and 0 <= index < len(self._levels[level]):
                found[node_id] = self._levels[level][index]
        return found
