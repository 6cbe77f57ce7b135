"""The default object store: files under one directory.

A write goes to a temporary file in ``.tmp/`` on the same filesystem, is fsynced, renamed
into place and the directory fsynced, so after a crash or a full disk an object is either
entirely there or absent (POSIX rename(2) is atomic within one filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from phivault.storage.base import (
    COPY_BUFFER,
    PROBE_KIND,
    StoredObject,
    new_object_key,
    validate_key,
)
from phivault.storage.errors import (
    ObjectNotFound,
    RetentionUnsupported,
    StorageError,
    StorageFull,
    StorageUnavailable,
)

_TMP_DIR = ".tmp"
STALE_TEMP_SECONDS = 3600


class FileObjectStore:
    """Objects as files below ``root``; keys map to relative paths."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
            msg = f"not a file:// URL of an absolute directory: {url!r}"
            raise ValueError(msg)
        self.url = url
        self.root = Path(unquote(parts.path))

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def prepare(self) -> None:
        """Create the store directory (0700) and sweep temp files left by a crash."""
        self._make_dirs()
        self.remove_stale_temp_files()

    def _make_dirs(self) -> None:
        (self.root / _TMP_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)

    def put(self, key: str, source: BinaryIO, *, retain_until: datetime | None = None) -> StoredObject:
        if retain_until is not None:
            raise RetentionUnsupported
        final = self._path(key)
        temp = self.root / _TMP_DIR / f"{secrets.token_hex(16)}.part"
        size = 0
        fd = -1
        try:
            with _filesystem_errors():
                self._make_dirs()
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            # Errors reading the source (a client that went away) propagate unchanged;
            # only errors of our own filesystem become StorageError.
            while chunk := source.read(COPY_BUFFER):
                with _filesystem_errors():
                    _write_all(fd, chunk)
                _start_writeback(fd, size, len(chunk))
                size += len(chunk)
            with _filesystem_errors():
                os.fsync(fd)
                os.close(fd)
                fd = -1
                final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                temp.replace(final)
                _fsync_dir(final.parent)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            _discard(temp)
            raise
        return StoredObject(key=key, size=size)

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except OSError as exc:
            raise _translate(exc) from None

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            msg = "range start and length must not be negative"
            raise ValueError(msg)
        with self.open(key) as handle:
            handle.seek(start)
            return handle.read(length)

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except OSError as exc:
            raise _translate(exc) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise _translate(exc) from None
        _fsync_dir(path.parent)

    def keys(self, prefix: str = "") -> Iterator[str]:
        if not self.root.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root:
                dirnames[:] = [name for name in dirnames if name != _TMP_DIR]
            relative = Path(dirpath).relative_to(self.root)
            for name in filenames:
                key = (relative / name).as_posix()
                if key.startswith(prefix):
                    yield key

    def probe(self) -> None:
        key = new_object_key(PROBE_KIND)
        payload = secrets.token_bytes(32)
        self.put(key, io.BytesIO(payload))
        if self.read_range(key, 0, len(payload)) != payload:
            raise StorageUnavailable("object store returned different bytes than written")
        self.delete(key)

    def remove_stale_temp_files(self, older_than_seconds: float = STALE_TEMP_SECONDS) -> int:
        """Delete temp files left by writes that were interrupted (by a crash); count them."""
        temp_dir = self.root / _TMP_DIR
        if not temp_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_seconds
        removed = 0
        for entry in temp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
        return removed


@contextlib.contextmanager
def _filesystem_errors() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _translate(exc) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _discard(temp: Path) -> None:
    with contextlib.suppress(OSError):
        temp.unlink(missing_ok=True)


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these just-written bytes to the disk now.

    Left alone, dirty pages wait for the final fsync (the background threshold is a share of
    the memory), which then writes the whole object while the sender waits; started as the
    bytes arrive, the writes overlap the receiving and the fsync finds little left. On Linux,
    POSIX_FADV_DONTNEED starts writeback of dirty pages in the range (and drops only pages
    already clean, so none of these). Advice only: durability still comes from the fsync.
    """
    if hasattr(os, "posix_fadvise"):  # not on macOS
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate(exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull()
    if exc.errno == errno.ENOENT:
        return ObjectNotFound()
    return StorageUnavailable(f"file store: {os.strerror(exc.errno or 0)}")
