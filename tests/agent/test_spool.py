"""The agent's encrypted spool, without a server: owner-only files, AES-256-GCM that
detects any change, resumable reads at any offset, and what is kept for how long.
"""

from __future__ import annotations

import ast
import io
import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from phivault.agent.spool import SEGMENT, Spool, SpoolError, State

T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    home = tmp_path / "agent"
    home.mkdir(mode=0o755)
    made = Spool(home / "spool", home / "spool.key")
    made.prepare()
    return made


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_spool_files_are_owner_only_even_under_a_lax_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        made = Spool(tmp_path / "spool", tmp_path / "spool.key")
        made.prepare()
        item = made.add(io.BytesIO(b"exam bytes" * 1000), T0)
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "spool") == 0o700
    assert _mode(tmp_path / "spool.key") == 0o600
    assert _mode(made.blob_path(item.id)) == 0o600
    assert _mode(tmp_path / "spool" / f"{item.id}.json") == 0o600


@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT + 17])
def test_any_range_reads_back_what_was_added(spool: Spool, size: int) -> None:
    data = os.urandom(size)
    item = spool.add(io.BytesIO(data), T0)
    assert item.size == size
    assert spool.read(item, 0, size) == data
    for offset in {0, size // 3, max(0, size - 5)}:
        length = min(SEGMENT + 7, size - offset)
        assert spool.read(item, offset, length) == data[offset : offset + length]
    assert spool.verify(item)


def test_the_copy_is_encrypted(spool: Spool) -> None:
    secret = b"Quixworth^Zelphine^Marguerite " * 2000
    item = spool.add(io.BytesIO(secret), T0)
    stored = spool.blob_path(item.id).read_bytes()
    assert b"Quixworth" not in stored
    record = (spool.directory / f"{item.id}.json").read_text()
    assert "Quixworth" not in record


@pytest.mark.parametrize("damage", ["flip a byte", "truncate a segment", "drop the last segment", "append"])
def test_any_change_to_a_spool_file_is_detected(spool: Spool, damage: str) -> None:
    data = os.urandom(2 * SEGMENT + 100)
    item = spool.add(io.BytesIO(data), T0)
    path = spool.blob_path(item.id)
    stored = bytearray(path.read_bytes())
    if damage == "flip a byte":
        stored[len(stored) // 2] ^= 0x01
    elif damage == "truncate a segment":
        del stored[-50:]
    elif damage == "drop the last segment":
        del stored[-(100 + 16) :]
    else:
        stored += b"\x00" * 16
    path.write_bytes(bytes(stored))
    with pytest.raises(SpoolError):
        spool.verify(item)


def test_a_copy_moved_to_another_item_does_not_decrypt(spool: Spool) -> None:
    first = spool.add(io.BytesIO(b"a" * 5000), T0)
    second = spool.add(io.BytesIO(b"b" * 5000), T0)
    spool.blob_path(second.id).write_bytes(spool.blob_path(first.id).read_bytes())
    with pytest.raises(SpoolError):
        spool.read(second, 0, 10)


def test_confirmed_copies_go_at_once_and_their_records_after_the_retention(spool: Spool) -> None:
    item = spool.add(io.BytesIO(b"x" * 100), T0)
    confirmed = spool.confirm(item, {"status": "stored", "sha256": item.sha256}, T0 + timedelta(hours=1))
    assert not spool.blob_path(item.id).exists()
    assert confirmed.state == State.CONFIRMED
    assert spool.tidy(T0 + timedelta(days=30), retain=timedelta(days=30)) == 0
    assert spool.get(item.id) is not None
    assert spool.tidy(T0 + timedelta(days=30, hours=2), retain=timedelta(days=30)) == 1
    assert spool.get(item.id) is None


def test_unconfirmed_items_are_never_dropped_by_tidying(spool: Spool) -> None:
    item = spool.add(io.BytesIO(b"x" * 100), T0)
    refused = spool.add(io.BytesIO(b"y" * 100), T0)
    spool.save(refused.but(state=State.REJECTED, rejected_code="dicom_not_dicom"))
    assert spool.tidy(T0 + timedelta(days=3650), retain=timedelta(days=0)) == 0
    assert {i.id for i in spool.items()} == {item.id, refused.id}
    assert spool.blob_path(item.id).exists()
    assert spool.blob_path(refused.id).exists()


def test_what_a_crash_left_is_cleaned_and_nothing_else(spool: Spool) -> None:
    kept = spool.add(io.BytesIO(b"k" * 100), T0)
    half_added = spool.directory / "0123456789abcdef0123456789abcdef.pvs"  # a file without a record
    half_added.write_bytes(b"partial")
    temporary = spool.directory / ".0123.json.abcdef.tmp"
    temporary.write_bytes(b"{")
    confirmed = spool.add(io.BytesIO(b"c" * 100), T0)
    record = spool.directory / f"{confirmed.id}.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "state": "confirmed"}))
    spool.prepare()
    spool.tidy(T0, retain=timedelta(days=30))
    assert not half_added.exists()
    assert not temporary.exists()
    assert not spool.blob_path(confirmed.id).exists()  # confirmed just before a crash
    assert spool.blob_path(kept.id).exists()


def test_the_agent_imports_nothing_from_the_server() -> None:
    code = (
        "import sys, phivault.agent.cli, phivault.agent.sync;"
        "print(sorted(m for m in sys.modules if m.startswith('phivault')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = ast.literal_eval(result.stdout)
    allowed = {"phivault", "phivault.agent"}
    assert [m for m in loaded if m not in allowed and not m.startswith("phivault.agent.")] == []
