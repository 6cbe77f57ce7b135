"""Cryptography for data at rest: the streaming object format, the key hierarchy and keyrings."""
