"""Audit log errors. Messages name sizes and node positions, never record content."""

from __future__ import annotations


class AuditError(Exception):
    """Base class of audit log errors."""

    default_message = "audit log error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)


class ProofError(AuditError):
    """A Merkle proof does not verify, or a tree size, index or hash is not valid."""

    default_message = "Merkle proof or tree input is not valid"


class NodeSourceError(AuditError):
    """A node needed for a proof was not returned by the node source, or is not a hash."""

    default_message = "the node source did not return a stored hash for a needed node"


class CheckpointError(AuditError):
    """A signed checkpoint is malformed, or not validly signed by the expected key."""

    default_message = "checkpoint is malformed or not validly signed"
