"""The local keyring's master key: 32 random bytes, base64 in a file of mode 0600.

An operator makes one with ``openssl rand -base64 32 > master.key`` and keeps it outside
the data directory (and outside its backups), so a stolen data directory is useless.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

MASTER_KEY_BYTES = 32


class MasterKeyError(Exception):
    """The master key file is missing, unreadable, malformed or unsafe."""


def generate_master_key_file(path: Path) -> None:
    """Write a fresh master key with mode 0600; refuses to overwrite an existing one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    encoded = base64.b64encode(secrets.token_bytes(MASTER_KEY_BYTES)) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(encoded)
        handle.flush()
        os.fsync(handle.fileno())


def read_master_key(path: Path) -> bytes:
    """Return the 32-byte key, after checking the file is private to its owner."""
    try:
        mode = path.stat().st_mode
        text = path.read_bytes()
    except OSError as exc:
        msg = f"cannot read master key file {path}: {exc.strerror}"
        raise MasterKeyError(msg) from None
    if stat.S_IMODE(mode) & 0o077:
        msg = f"master key file {path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600"
        raise MasterKeyError(msg)
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        msg = f"master key file {path} is not base64"
        raise MasterKeyError(msg) from None
    if len(key) != MASTER_KEY_BYTES:
        msg = f"master key file {path} must hold {MASTER_KEY_BYTES} bytes, not {len(key)}"
        raise MasterKeyError(msg)
    if len(set(key)) < MASTER_KEY_BYTES // 4:
        # 32 random bytes have ~30 distinct values; a handful means a placeholder.
        msg = f"master key file {path} looks like a placeholder, not a random key"
        raise MasterKeyError(msg)
    return key
