"""``phivault keys status|rotate`` as an operator runs them, including a kill -9 mid-rotation."""

from __future__ import annotations

import io
import json
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from phivault.clock import SystemClock
from phivault.config.settings import load_settings
from phivault.crypto.service import ObjectContext
from phivault.runtime import Runtime, build_runtime
from servers.phivault import PHIVAULT, phivault_env


def run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PHIVAULT, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _runtime(data_dir: Path) -> Runtime:
    return build_runtime(load_settings(data_dir=data_dir), clock=SystemClock())


def _populate(data_dir: Path, institution_id: str, patients: int) -> list[tuple[ObjectContext, str, bytes]]:
    """An institution key, ``patients`` patient keys and one object for each of the first 5."""
    runtime = _runtime(data_dir)
    try:
        with runtime.db.transaction() as session:
            now = runtime.clock.now()
            runtime.keys.new_institution_key(session, institution_id, now)
            contexts = [
                ObjectContext(
                    institution_id, runtime.keys.new_patient_key(session, institution_id, now), "exam"
                )
                for _ in range(patients)
            ]
        objects = []
        for n, context in enumerate(contexts[:5]):
            data = random.Random(n).randbytes(10_000 + n)
            with runtime.db.transaction() as session:
                stored = runtime.keys.encrypt_object(
                    runtime.store, io.BytesIO(data), session=session, context=context
                )
            objects.append((context, stored.key, data))
        return objects
    finally:
        runtime.close()


def _assert_readable(data_dir: Path, objects: list[tuple[ObjectContext, str, bytes]]) -> None:
    runtime = _runtime(data_dir)
    try:
        for context, key, data in objects:
            with runtime.db.transaction() as session:
                opened = runtime.keys.open_object(runtime.store, key, session=session, context=context)
            assert opened.read(0, opened.plaintext_size) == data
    finally:
        runtime.close()


def test_status_and_rotation_of_root_and_institution_keys(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = phivault_env(data_dir)
    assert run("init", env=env).returncode == 0
    objects = _populate(data_dir, "inst-a", 12)

    status = run("keys", "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert [(v["version"], v["current"]) for v in report["root_versions"]] == [(1, True)]
    assert [(k["institution_id"], k["version"], k["wraps"]) for k in report["institution_keys"]] == [
        ("inst-a", 1, 12)
    ]
    assert report["overdue"] == []

    rotated = run("keys", "rotate", "--institution", "inst-a", "--json", env=env)
    assert rotated.returncode == 0, rotated.stderr
    progress = json.loads(rotated.stdout)
    assert (progress["done"], progress["rewrapped"], progress["to_version"]) == (True, 12, 2)

    root = run("keys", "rotate", "--json", env=env)
    assert root.returncode == 0, root.stderr
    assert json.loads(root.stdout)["status"] == "settling"  # a worker retires v1 later

    after = json.loads(run("keys", "status", "--json", env=env).stdout)
    assert [(v["version"], v["current"]) for v in after["root_versions"]] == [(1, False), (2, True)]
    assert [(k["version"], k["status"], k["wraps"]) for k in after["institution_keys"]] == [
        (1, "retired", 0),
        (2, "current", 12),
    ]
    text = run("keys", "status", env=env)
    assert text.returncode == 0
    assert "inst-a" in text.stdout
    _assert_readable(data_dir, objects)


def test_rotating_an_institution_without_a_key_fails_with_one_line(tmp_path: Path) -> None:
    env = phivault_env(tmp_path / "data")
    assert run("init", env=env).returncode == 0
    result = run("keys", "rotate", "--institution", "nobody", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == "phivault: error: institution nobody has no key to rotate"


def test_background_rotation_is_resumed_by_running_the_command_again(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = phivault_env(data_dir)
    assert run("init", env=env).returncode == 0
    objects = _populate(data_dir, "inst-a", 5)
    queued = json.loads(
        run("keys", "rotate", "--institution", "inst-a", "--background", "--json", env=env).stdout
    )
    assert (queued["status"], queued["rewrapped"], queued["total"]) == ("rewrapping", 0, 5)
    again = json.loads(run("keys", "rotate", "--institution", "inst-a", "--json", env=env).stdout)
    assert again["id"] == queued["id"]
    assert (again["done"], again["rewrapped"]) == (True, 5)
    _assert_readable(data_dir, objects)


def _rewrapped(data_dir: Path) -> int:
    database = sqlite3.connect(data_dir / "phivault.sqlite3", timeout=30)
    try:
        row = database.execute("SELECT max(rewrapped) FROM key_rotations").fetchone()
    finally:
        database.close()
    return int(row[0] or 0)


def test_killed_rotation_completes_when_run_again_and_loses_no_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = phivault_env(data_dir)
    assert run("init", env=env).returncode == 0
    patients = 4000  # 20 batches
    objects = _populate(data_dir, "inst-a", patients)
    process = subprocess.Popen(
        [PHIVAULT, "keys", "rotate", "--institution", "inst-a", "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill as soon as the first batch committed: mid-rotation, whatever the machine's speed.
    deadline = time.monotonic() + 60
    while _rewrapped(data_dir) == 0 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    killed_at = _rewrapped(data_dir)
    assert 0 < killed_at < patients, "the kill should land between the first and the last batch"
    finished = run("keys", "rotate", "--institution", "inst-a", "--json", env=env)
    assert finished.returncode == 0, finished.stderr
    progress = json.loads(finished.stdout)
    assert progress["done"] is True
    status = json.loads(run("keys", "status", "--json", env=env).stdout)
    assert [(k["version"], k["status"], k["wraps"]) for k in status["institution_keys"]] == [
        (1, "retired", 0),
        (2, "current", patients),
    ]
    _assert_readable(data_dir, objects)
