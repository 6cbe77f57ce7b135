"""``phivault-agent`` against a real ``phivault serve`` over TLS: activation with a pinned
certificate, an offline queue, sync with receipts, revocation, and the faults the issue
names: the server killed mid-upload, the agent killed mid-sync.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import signal
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from agent.conftest import Agent, Deployment, exam, run_phivault
from phivault.agent.cli import Home
from phivault.agent.spool import Item, Spool, utcnow
from phivault.agent.sync import Progress, Syncer, SyncOptions
from phivault.devices.models import UploadChunk
from phivault.exams.models import Instance
from servers.common import wait_until
from servers.phivault import PhivaultServer

CHUNK = 1024 * 1024
RESUMABLE = ("--chunk-size", str(CHUNK), "--max-backoff", "0.5", "--max-attempts", "200")


def instances(deployment: Deployment) -> list[tuple[str, str | None, str]]:
    runtime = deployment.runtime()
    try:
        with runtime.db.transaction() as session:
            rows = session.execute(
                select(Instance.received_sha256, Instance.device_id, Instance.channel)
            ).all()
            return [tuple(row) for row in rows]  # type: ignore[misc]
    finally:
        runtime.close()


def chunk_count(deployment: Deployment, upload_id: str) -> int:
    runtime = deployment.runtime()
    try:
        with runtime.db.transaction() as session:
            return int(
                session.scalar(
                    select(func.count()).select_from(UploadChunk).where(UploadChunk.upload_id == upload_id)
                )
                or 0
            )
    finally:
        runtime.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_activate_queue_offline_sync_and_purge(deployment: Deployment, tmp_path: Path) -> None:
    agent = deployment.agent(tmp_path / "agent")
    config = json.loads((agent.home / "config.json").read_text())
    assert stat.S_IMODE((agent.home / "device-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(agent.home.stat().st_mode) == 0o700
    assert config["pins"][0].startswith("sha256//")
    first, second = exam(tmp_path / "a.dcm", sop="1"), exam(tmp_path / "b.dcm", sop="2")

    deployment.server.terminate()  # offline: queueing needs no network
    added = agent.json("add", str(first), str(second), str(first))
    assert [entry["already_queued"] for entry in added["queued"]] == [False, False, True]
    status = agent.json("status")
    assert (status["queued"], status["confirmed"]) == (2, 0)
    offline = agent.run("sync", "--json", "--max-attempts", "2", "--max-backoff", "0")
    assert offline.returncode == 1
    assert json.loads(offline.stdout)["unconfirmed"] == 2

    deployment.server.start()
    synced = agent.run("sync", "--json")
    assert synced.returncode == 0, synced.stderr
    report = json.loads(synced.stdout)
    assert (report["confirmed"], report["unconfirmed"]) == (2, 0)
    assert {item["receipt_status"] for item in report["items"]} == {"stored"}
    assert sorted(instances(deployment)) == sorted(
        [(sha256(first), config["device_id"], "upload"), (sha256(second), config["device_id"], "upload")]
    )
    assert list((agent.home / "spool").glob("*.pvs")) == []  # local copies gone once confirmed
    status = agent.json("status")
    assert (status["queued"], status["confirmed"], status["warnings"]) == (0, 2, [])
    assert agent.json("sync")["confirmed"] == 0  # nothing left to send
    purged = agent.json("purge")
    assert purged["removed"] == {"confirmed": 2, "rejected": 0, "queued": 0}
    assert agent.json("status")["items"] == []


def test_a_wrong_pin_stops_activation_before_the_code_is_sent(deployment: Deployment, tmp_path: Path) -> None:
    code, pin = deployment.code()
    agent = Agent(tmp_path / "agent", deployment.server)
    base = ("activate", "--server", deployment.server.base_url, "--code", code, "--ca-cert")
    wrong = agent.run(*base, str(deployment.server.ca_file), "--pin", "sha256//" + "A" * 43 + "=")
    assert wrong.returncode == 1
    assert "does not match the pin" in wrong.stderr
    assert not (agent.home / "config.json").exists()
    # the code was never sent: it still activates the device
    right = agent.run(*base, str(deployment.server.ca_file), "--pin", pin)
    assert right.returncode == 0, right.stderr


def test_a_server_certificate_the_device_does_not_trust_is_refused(
    deployment: Deployment, tmp_path: Path
) -> None:
    code, _ = deployment.code()
    agent = Agent(tmp_path / "agent", deployment.server)
    refused = agent.run("activate", "--server", deployment.server.base_url, "--code", code)
    assert refused.returncode == 1
    assert "certificate verify failed" in refused.stderr


def test_a_revoked_device_stops_at_once_and_keeps_its_queue(deployment: Deployment, tmp_path: Path) -> None:
    agent = deployment.agent(tmp_path / "agent")
    device_id = json.loads((agent.home / "config.json").read_text())["device_id"]
    listed = json.loads(run_phivault(deployment.env, "device", "list", "--json").stdout)
    assert [row["id"] for row in listed] == [device_id]
    revoked = run_phivault(deployment.env, "device", "revoke", device_id, "--json")
    assert revoked.returncode == 0, revoked.stderr
    agent.json("add", str(exam(tmp_path / "a.dcm")))
    result = agent.run("sync", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["items"][0]["error"].startswith("device_revoked")
    assert report["unconfirmed"] == 1
    assert len(list((agent.home / "spool").glob("*.pvs"))) == 1


def test_old_unconfirmed_items_are_warned_about_and_old_confirmed_ones_forgotten(
    deployment: Deployment, tmp_path: Path
) -> None:
    agent = deployment.agent(tmp_path / "agent")
    done = agent.json("add", str(exam(tmp_path / "a.dcm", sop="1")))["queued"][0]["id"]
    assert agent.run("sync").returncode == 0
    waiting = agent.json("add", str(exam(tmp_path / "b.dcm", sop="2")))["queued"][0]["id"]
    long_ago = (datetime.now(UTC) - timedelta(days=31)).isoformat()
    for item_id, field in ((done, "confirmed_at"), (waiting, "added_at")):
        record = agent.home / "spool" / f"{item_id}.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), field: long_ago}))
    status = agent.json("status")
    assert [item["id"] for item in status["items"]] == [waiting]
    assert "not confirmed by the server" in status["warnings"][0]


def test_one_sync_at_a_time(deployment: Deployment, tmp_path: Path) -> None:
    agent = deployment.agent(tmp_path / "agent")
    with (agent.home / "sync.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        second = agent.run("sync")
    assert second.returncode == 1
    assert "another phivault-agent sync is running" in second.stderr


def _wait_for_progress(deployment: Deployment, at_least: int, at_most: int) -> str:
    found: list[str] = []

    def started() -> bool:
        uploads = deployment.uploads()
        if uploads and at_least <= uploads[0].offset < at_most:
            found.append(uploads[0].id)
            return True
        return False

    wait_until(started, timeout=120, what="an upload half-way", interval=0.05)
    return found[0]


def test_server_killed_mid_upload_resumes_and_the_exam_arrives_once(
    deployment: Deployment, tmp_path: Path
) -> None:
    agent = deployment.agent(tmp_path / "agent")
    big = exam(tmp_path / "cine.dcm", frames=24, rows=480, columns=640)  # ~22 MB
    size = big.stat().st_size
    agent.json("add", str(big))
    sync = agent.start("sync", "--json", *RESUMABLE, "--max-rate", "4000000")
    upload_id = _wait_for_progress(deployment, 2 * 1024 * 1024, size // 2)
    deployment.server.kill()  # SIGKILL: no graceful anything
    offset_at_kill = deployment.uploads()[0].offset
    restarted = PhivaultServer(deployment.server.data_dir, port=deployment.server.port)
    restarted.start()
    try:
        stdout, stderr = sync.communicate(timeout=300)
        assert sync.returncode == 0, stderr
        report = json.loads(stdout)
        assert (report["confirmed"], report["unconfirmed"]) == (1, 0)
        assert report["items"][0]["attempts"] > 1
        # resumed, not restarted: every byte acknowledged once (a chunk in flight at the kill
        # may have been stored without its answer arriving: the agent then skips it)
        assert size - CHUNK <= report["items"][0]["sent_bytes"] <= size
        uploads = deployment.uploads()
        assert [(u.id, u.status) for u in uploads] == [(upload_id, "finished")]
        assert offset_at_kill > 0
        assert instances(deployment) == [
            (sha256(big), json.loads((agent.home / "config.json").read_text())["device_id"], "upload")
        ]
    finally:
        restarted.kill()


def test_agent_killed_mid_sync_loses_nothing_and_sends_nothing_twice(
    deployment: Deployment, tmp_path: Path
) -> None:
    agent = deployment.agent(tmp_path / "agent")
    big = exam(tmp_path / "cine.dcm", frames=24, rows=480, columns=640)
    size = big.stat().st_size
    agent.json("add", str(big))
    sync = agent.start("sync", "--json", *RESUMABLE, "--max-rate", "4000000")
    upload_id = _wait_for_progress(deployment, 2 * 1024 * 1024, size // 2)
    sync.send_signal(signal.SIGKILL)
    sync.communicate(timeout=30)
    assert len(list((agent.home / "spool").glob("*.pvs"))) == 1  # the local copy is intact
    offset_at_kill = deployment.uploads()[0].offset
    again = agent.run("sync", "--json", *RESUMABLE)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["confirmed"] == 1
    # resumed from the server's offset (plus or minus the chunk that was in flight)
    assert size - offset_at_kill - CHUNK <= report["items"][0]["sent_bytes"] <= size - offset_at_kill
    assert [(u.id, u.status) for u in deployment.uploads()] == [(upload_id, "finished")]
    assert chunk_count(deployment, upload_id) >= 2
    assert len(instances(deployment)) == 1
    assert instances(deployment)[0][0] == sha256(big)
    assert list((agent.home / "spool").glob("*.pvs")) == []


class _CountingSpool(Spool):
    """The real spool, counting the plaintext bytes it decrypts."""

    decrypted = 0

    def iter_range(self, item: Item, offset: int, length: int) -> Iterator[bytes]:
        for piece in super().iter_range(item, offset, length):
            self.decrypted += len(piece)
            yield piece


def test_each_chunk_is_decrypted_from_the_spool_once(deployment: Deployment, tmp_path: Path) -> None:
    agent = deployment.agent(tmp_path / "agent")
    cine = exam(tmp_path / "cine.dcm", frames=6, rows=240, columns=320)  # ~1.4 MB
    agent.json("add", str(cine))
    place = Home(agent.home, timedelta(days=30))
    spool = _CountingSpool(place.path / "spool", place.path / "spool.key")
    client = place.client()
    try:
        syncer = Syncer(spool, client, SyncOptions(chunk_size=256 * 1024), Progress(), now=utcnow)
        report = syncer.run()
    finally:
        client.close()
    assert (report.confirmed, report.items[0].sent_bytes) == (1, cine.stat().st_size)
    assert spool.decrypted == cine.stat().st_size  # hashed and sent from the same decryption
    assert instances(deployment)[0][0] == sha256(cine)
