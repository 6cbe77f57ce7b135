"""The local keyring's own promises: the file, the master key, several processes.

The behaviour every backend shares is in tests/integration/keyring/test_keyring_contract.py.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from phivault.clock import ManualClock
from phivault.crypto.keyring import (
    KeyringUnavailable,
    LocalKeyring,
    WrappedKey,
    open_keyring,
)
from phivault.crypto.keyring.local import KEYRING_FILE_NAME
from phivault.crypto.master_key import generate_master_key_file

AAD = b"institution:1"


@pytest.fixture
def master_key_path(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "master.key"
    generate_master_key_file(path)
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def _open(data_dir: Path, master_key_path: Path) -> LocalKeyring:
    return LocalKeyring(data_dir=data_dir, master_key_path=master_key_path)


def test_first_use_creates_version_1_in_a_private_file(data_dir: Path, master_key_path: Path) -> None:
    keyring = _open(data_dir, master_key_path)

    keyring.check()

    path = data_dir / KEYRING_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keyring.current_version() == 1
    assert keyring.key_id.startswith("local-")
    assert json.loads(path.read_text())["format"] == "phivault-local-keyring/1"


def test_open_keyring_chooses_the_local_keyring_by_default_url(data_dir: Path, master_key_path: Path) -> None:
    keyring = open_keyring("local://", data_dir=data_dir, master_key_path=master_key_path)

    assert isinstance(keyring, LocalKeyring)
    assert str(data_dir / KEYRING_FILE_NAME) in keyring.describe()


def test_wrong_master_key_does_not_open_the_keyring(
    data_dir: Path, master_key_path: Path, tmp_path: Path
) -> None:
    _open(data_dir, master_key_path).check()
    other_key = tmp_path / "other" / "master.key"
    generate_master_key_file(other_key)

    with pytest.raises(KeyringUnavailable, match=r"master key .* does not open the keyring"):
        _open(data_dir, other_key).check()


def test_missing_master_key_is_reported(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyringUnavailable, match="cannot read master key file"):
        _open(data_dir, tmp_path / "absent.key").check()


def test_keyring_file_readable_by_others_is_refused(data_dir: Path, master_key_path: Path) -> None:
    _open(data_dir, master_key_path).check()
    (data_dir / KEYRING_FILE_NAME).chmod(0o644)

    with pytest.raises(KeyringUnavailable, match="chmod 600"):
        _open(data_dir, master_key_path).check()


def test_edited_keyring_file_is_refused(data_dir: Path, master_key_path: Path) -> None:
    keyring = _open(data_dir, master_key_path)
    keyring.check()
    keyring.create_version()
    keyring.retire(1)
    path = data_dir / KEYRING_FILE_NAME
    document = json.loads(path.read_text())
    document["versions"][0]["retired_at"] = None  # un-retire without the master key
    path.write_text(json.dumps(document))

    with pytest.raises(KeyringUnavailable, match="does not open the keyring"):
        _open(data_dir, master_key_path).versions()


def test_damaged_keyring_file_is_refused(data_dir: Path, master_key_path: Path) -> None:
    _open(data_dir, master_key_path).check()
    path = data_dir / KEYRING_FILE_NAME
    path.write_text(path.read_text()[:-40])

    with pytest.raises(KeyringUnavailable, match="damaged or not a phivault keyring"):
        _open(data_dir, master_key_path).check()


def test_keyring_file_holds_no_institution_key_nor_master_key(data_dir: Path, master_key_path: Path) -> None:
    keyring = _open(data_dir, master_key_path)
    institution_keys = [secrets.token_bytes(32) for _ in range(5)]
    for key in institution_keys:
        keyring.wrap(key, aad=AAD)
    keyring.create_version()
    raw = (data_dir / KEYRING_FILE_NAME).read_bytes()
    master = base64.b64decode(master_key_path.read_bytes())

    for secret in [*institution_keys, master]:
        for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
            assert form[:12] not in raw


def test_a_vanished_keyring_file_is_not_silently_recreated(data_dir: Path, master_key_path: Path) -> None:
    keyring = _open(data_dir, master_key_path)
    keyring.check()
    (data_dir / KEYRING_FILE_NAME).unlink()

    with pytest.raises(KeyringUnavailable, match="has disappeared"):
        keyring.wrap(secrets.token_bytes(32), aad=AAD)


def test_versions_carry_the_clock_time(data_dir: Path, master_key_path: Path) -> None:
    clock = ManualClock()
    keyring = LocalKeyring(data_dir=data_dir, master_key_path=master_key_path, clock=clock)
    keyring.check()
    clock.advance(timedelta(days=30))

    keyring.create_version()

    created = [version.created_at for version in keyring.versions()]
    assert created == [clock.now() - timedelta(days=30), clock.now()]


_CREATE_VERSION = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from phivault.crypto.keyring import LocalKeyring

    data_dir, master_key, start = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    keyring = LocalKeyring(data_dir=data_dir, master_key_path=master_key)
    keyring.current_version()
    while time.time() < start:
        time.sleep(0.001)
    print(keyring.create_version(), keyring.create_version())
    """
)


def test_versions_created_by_concurrent_processes_are_distinct(data_dir: Path, master_key_path: Path) -> None:
    _open(data_dir, master_key_path).check()
    start = time.time() + 1.5
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CREATE_VERSION, str(data_dir), str(master_key_path), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        for _ in range(4)
    ]
    created: list[int] = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        created += [int(number) for number in out.split()]

    assert sorted(created) == list(range(2, 10))
    keyring = _open(data_dir, master_key_path)
    assert [version.version for version in keyring.versions()] == list(range(1, 10))
    key = secrets.token_bytes(32)
    assert keyring.unwrap(keyring.wrap(key, aad=AAD), aad=AAD) == key


def test_another_process_sees_a_new_version_at_its_next_operation(
    data_dir: Path, master_key_path: Path
) -> None:
    reader, writer = _open(data_dir, master_key_path), _open(data_dir, master_key_path)
    assert reader.current_version() == 1

    writer.create_version()
    wrapped = writer.wrap(secrets.token_bytes(32), aad=AAD)

    assert reader.current_version() == 2
    assert reader.wrap(secrets.token_bytes(32), aad=AAD).version == 2
    assert len(reader.unwrap(WrappedKey.from_bytes(wrapped.to_bytes()), aad=AAD)) == 32
