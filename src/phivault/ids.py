"""Identifiers and secret tokens.

Row ids are UUIDv4 from the OS CSPRNG, so an id reveals neither order nor count of
records (ids appear in URLs and audit records). Tokens are opaque and carry at least
128 bits from ``secrets`` (DESIGN.md §5).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid

TOKEN_BYTES = 32  # 256 bits: above the 128-bit floor of DESIGN.md §5 and OWASP ASVS 7.2.3

_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def new_id() -> str:
    """Return a random UUIDv4 in canonical lower-case text form."""
    return str(uuid.uuid4())


def is_id(value: str) -> bool:
    """Tell whether ``value`` is an id as ``new_id`` makes them."""
    return bool(_ID_RE.fullmatch(value))


def new_token() -> str:
    """Return an opaque URL-safe token of ``TOKEN_BYTES`` random bytes."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    """Hash a token for storage: tokens are stored hashed, never in clear.

    Tokens have 256 bits of entropy, so a fast hash is enough (no password stretching).
    """
    return hashlib.sha256(token.encode()).hexdigest()
