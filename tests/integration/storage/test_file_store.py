from __future__ import annotations

import contextlib
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from phivault.storage.base import new_object_key, validate_key
from phivault.storage.errors import InvalidObjectKey, ObjectNotFound, StorageFull
from phivault.storage.file import FileObjectStore
from servers.common import unavailable


@pytest.fixture
def store(tmp_path: Path) -> FileObjectStore:
    return FileObjectStore((tmp_path / "objects").as_uri())


def test_round_trip_reports_the_size(store: FileObjectStore) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    key = new_object_key("instances")
    stored = store.put(key, io.BytesIO(payload))
    assert (stored.key, stored.size) == (key, len(payload))
    with store.open(key) as handle:
        assert handle.read() == payload
    assert store.read_range(key, 1000, 10) == payload[1000:1010]
    assert store.read_range(key, len(payload) - 3, 100) == payload[-3:]
    assert store.size(key) == len(payload)


def test_objects_are_private_to_the_service_user(store: FileObjectStore) -> None:
    key = new_object_key("instances")
    store.put(key, io.BytesIO(b"x"))
    assert (store.root / key).stat().st_mode & 0o077 == 0


def test_empty_object(store: FileObjectStore) -> None:
    key = new_object_key("instances")
    assert store.put(key, io.BytesIO(b"")).size == 0
    assert store.read_range(key, 0, 10) == b""


def test_keys_lists_by_prefix_and_skips_temporary_files(store: FileObjectStore) -> None:
    keys = {new_object_key("a") for _ in range(5)} | {new_object_key("b")}
    for key in keys:
        store.put(key, io.BytesIO(b"1"))
    (store.root / ".tmp" / "leftover.part").write_bytes(b"partial")
    assert set(store.keys()) == keys
    assert set(store.keys("a/")) == {key for key in keys if key.startswith("a/")}


def test_delete_is_idempotent_and_missing_objects_say_so(store: FileObjectStore) -> None:
    key = new_object_key("instances")
    store.put(key, io.BytesIO(b"1"))
    store.delete(key)
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.open(key)
    with pytest.raises(ObjectNotFound):
        store.size(key)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "../etc/passwd",
        "a/../../b",
        "/abs",
        "a//b",
        "a/",
        "A/upper",
        "a/./b",
        "a\\b",
        "a/b\x00",
        "x" * 600,
        ".hidden",
    ],
)
def test_keys_that_phivault_never_generates_are_refused(store: FileObjectStore, key: str) -> None:
    with pytest.raises(InvalidObjectKey):
        validate_key(key)
    with pytest.raises(InvalidObjectKey):
        store.put(key, io.BytesIO(b"1"))
    with pytest.raises(InvalidObjectKey):
        store.open(key)


def test_interrupted_write_leaves_nothing(store: FileObjectStore) -> None:
    class Exploding(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise ConnectionResetError("client went away")
            return b"x" * max(size, 1)

    key = new_object_key("instances")
    with pytest.raises(ConnectionResetError):
        store.put(key, Exploding())  # type: ignore[arg-type]
    assert not store.exists(key)
    assert list((store.root / ".tmp").iterdir()) == []


def test_stale_temporary_files_are_swept(store: FileObjectStore) -> None:
    store.prepare()
    stale = store.root / ".tmp" / "crashed.part"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    fresh = store.root / ".tmp" / "in-flight.part"
    fresh.write_bytes(b"partial")
    store.prepare()  # what every start-up does
    assert not stale.exists()
    assert fresh.exists()


@contextlib.contextmanager
def _small_filesystem(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        unavailable(f"cannot mount a size-limited tmpfs (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_fails_cleanly_and_reads_keep_working(tmp_path: Path) -> None:
    with _small_filesystem(tmp_path / "small", "1m") as mount:
        store = FileObjectStore((mount / "objects").as_uri())
        kept = new_object_key("instances")
        store.put(kept, io.BytesIO(b"already stored"))
        too_big = new_object_key("instances")
        with pytest.raises(StorageFull):
            store.put(too_big, io.BytesIO(os.urandom(2 * 1024 * 1024)))
        assert not store.exists(too_big)
        assert list((store.root / ".tmp").iterdir()) == []
        assert store.read_range(kept, 0, 100) == b"already stored"
        assert set(store.keys()) == {kept}
