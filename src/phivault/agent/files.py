"""The agent's home directory: owner-only permissions and crash-safe writes.

Directories are 0700 and files 0600 whatever the umask. A file is written to a temporary
name beside its target, flushed to disk, renamed over it (rename(2) is atomic), and the
directory is flushed too: after a crash a reader sees the old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def private_directory(path: Path) -> Path:
    path.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    path.chmod(DIRECTORY_MODE)
    return path


def fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A 0600 file that replaces ``path`` only once everything was written and flushed."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.fchmod(descriptor, FILE_MODE)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
        fsync_directory(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_private(path: Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        fsync_directory(path.parent)


def stray_temporaries(directory: Path) -> Iterator[Path]:
    """Temporary files a crash left behind (never renamed into place)."""
    return (p for p in directory.glob(".*.tmp") if p.is_file())
