"""Tamper-evident audit log.

The pure core lives here: the RFC 9162 Merkle tree (``merkle``) and signed checkpoints in
the transparency-dev / C2SP checkpoint format (``checkpoint``). Neither touches the
database or the clock; the audit service feeds them stored records and nodes.
"""
