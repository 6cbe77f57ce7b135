"""Device uploads through ``phivault-agent``: one large exam, then many agents at once.

    .venv/bin/python bench/upload.py [--size-mib 1024] [--agents 50] [--write-docs]

Starts ``phivault serve`` (embedded default: SQLite, file object store, local keyring, the
generated TLS certificate) on a free loopback port in a temporary directory, then:

1. writes one synthetic ultrasound multi-frame DICOM file of ``--size-mib`` MiB, and copies
   that same file once more with a final fsync beside it: the raw disk write speed of this
   run (the reference);
2. activates an agent (pinned TLS), ``add``s the file to its encrypted spool, and runs
   ``sync --json``: TLS, DPoP on every request, 16 MiB chunks each checksummed, encrypted
   into the object store as they arrive; then finalize (the server reads the chunks back,
   checks the SHA-256 of the whole and hands the file to the ingest pipeline);
3. activates ``--agents`` agents, each queues one small distinct exam, and all sync at once.

Reported: the upload's MB/s (chunks sent and stored, as the agent timed them) beside the
disk's, finalize and end-to-end times, peak RSS of the agent (``wait4``) and of the server
(``VmHWM``), and the errors of the concurrent run. Targets: upload ≥ 50 % of the disk
figure; agent and server RSS < 300 MB each; 0 errors. Exit status 1 if one is missed.
``--write-docs`` replaces this benchmark's section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset

from perfdoc import machine, write_section

BIN = Path(sys.executable).parent
PHIVAULT = str(BIN / "phivault")
AGENT = str(BIN / "phivault-agent")
MB = 1_000_000
MIB = 1024 * 1024
ROWS, COLUMNS = 480, 640
FRAME = ROWS * COLUMNS * 3
TARGET_RATIO = 0.5
TARGET_RSS = 300 * MB


@dataclass
class Result:
    size: int
    disk_seconds: float
    add_seconds: float
    upload_seconds: float
    finalize_seconds: float
    sync_seconds: float
    agent_rss: int
    server_rss: int
    server_upload_rss: int
    receipt_status: str
    agents: int
    concurrent_seconds: float
    concurrent_errors: list[str]
    load: tuple[float, float]  # 1-minute load average before and after

    @property
    def disk_rate(self) -> float:
        return self.size / self.disk_seconds / MB

    @property
    def upload_rate(self) -> float:
        return self.size / self.upload_seconds / MB

    @property
    def ratio(self) -> float:
        return self.upload_rate / self.disk_rate


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {done.stderr[-2000:]}")
    return done.stdout


def write_exam(path: Path, size: int, sop: str) -> int:
    """An ultrasound multi-frame instance of about ``size`` bytes, written as a stream: the
    header through pydicom, then the Pixel Data element's header and frames by hand (it is
    the last element), so no more than one block is ever in memory.
    """
    frames = max(1, (size - 4096) // FRAME)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = dicom_uid.UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1444.99.{sop}"
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1444.98.{sop}"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.1444.97.{sop}"
    ds.Modality = "US"
    ds.PatientName = "Bench^Patient"
    ds.PatientID = f"BENCH-{sop}"
    ds.Manufacturer = "Bench Sonics"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = "33.3"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = dicom_uid.PYDICOM_IMPLEMENTATION_UID
    pixels = frames * FRAME
    block = (bytes(range(256)) * (MIB // 256 + 1))[:MIB]
    with path.open("wb") as out:
        ds.save_as(out, enforce_file_format=True)
        out.write(struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\x00\x00" + struct.pack("<I", pixels))
        left = pixels
        while left:
            out.write(block[: min(left, MIB)])
            left -= min(left, MIB)
    return path.stat().st_size


def disk_write_seconds(source: Path, target: Path) -> float:
    """Copy ``source`` (in the page cache) to ``target`` and fsync: the disk's write speed."""
    started = time.perf_counter()
    with source.open("rb") as src, target.open("wb") as dst:
        while block := src.read(8 * MIB):
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Server:
    def __init__(self, workdir: Path) -> None:
        self.data = workdir / "data"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
        self.env["PHIVAULT_DATA_DIR"] = str(self.data)
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.institution = json.loads(_run(self.env, PHIVAULT, "institution", "create", "Bench", "--json"))[
            "id"
        ]
        self.log = workdir / "serve.log"
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                [PHIVAULT, "serve", "--port", str(self.port), "--dicom-port", str(_free_port())],
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(self.log.read_text(errors="replace")[-2000:]) from None
                time.sleep(0.2)

    def codes(self, count: int) -> list[str]:
        """Activation codes, made in one process (a CLI call each would take a minute)."""
        script = (
            "import json, sys\n"
            "from phivault.audit.service import Actor, SystemSubject\n"
            "from phivault.config.settings import load_settings\n"
            "from phivault.runtime import build_runtime\n"
            "runtime = build_runtime(load_settings())\n"
            "cli = SystemSubject(Actor.system('bench'))\n"
            f"codes = [runtime.devices.create_code(cli, {self.institution!r}).code for _ in range({count})]\n"
            "print(json.dumps(codes))\n"
        )
        codes: list[str] = json.loads(_run(self.env, sys.executable, "-c", script))
        return codes

    def pin(self) -> str:
        text = _run(self.env, PHIVAULT, "device", "code", "--institution", self.institution)
        return next(
            line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith("server certificate pin")
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def agent_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    env["PHIVAULT_AGENT_HOME"] = str(home)
    return env


def activate(server: Server, home: Path, code: str, pin: str) -> None:
    ca = str(server.data / "tls" / "cert.pem")
    _run(
        agent_env(home),
        AGENT,
        "activate",
        "--server",
        server.url,
        "--code",
        code,
        "--ca-cert",
        ca,
        "--pin",
        pin,
    )


class RssSampler:
    """The server's resident set every 50 ms, to tell the upload's memory from the ingest's."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append((time.perf_counter(), int(line.split()[1]) * 1024))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> int:
        return max((rss for moment, rss in self.samples if start <= moment <= end), default=0)


def sync_with_rss(home: Path) -> tuple[dict[str, Any], int, float]:
    """``phivault-agent sync --json``; its report, peak RSS in bytes (wait4), wall seconds."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [AGENT, "sync", "--json"], env=agent_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None  # noqa: S101  # piped above
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        raise RuntimeError(f"sync failed: {output.decode()[-2000:]} {stderr[-2000:]}")
    report: dict[str, Any] = json.loads(output)
    return report, usage.ru_maxrss * 1024, elapsed


def concurrent_run(server: Server, workdir: Path, agents: int) -> tuple[float, list[str]]:
    pin = server.pin()
    codes = server.codes(agents)
    homes = [workdir / f"agent-{index}" for index in range(agents)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda pair: activate(server, pair[0], pair[1], pin), zip(homes, codes, strict=True)))
    for index, home in enumerate(homes):
        exam = workdir / f"small-{index}.dcm"
        write_exam(exam, 2 * MIB, f"{index + 10}")
        _run(agent_env(home), AGENT, "add", str(exam))
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [AGENT, "sync", "--json"],
            env=agent_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for home in homes
    ]
    errors = []
    for home, process in zip(homes, processes, strict=True):
        stdout, stderr = process.communicate(timeout=3600)
        if process.returncode != 0:
            errors.append(f"{home.name}: exit {process.returncode}: {(stdout + stderr)[-300:]}")
            continue
        report = json.loads(stdout)
        if report["confirmed"] != 1:
            errors.append(f"{home.name}: {report}")
    return time.perf_counter() - started, errors


def run(size_mib: int, agents: int) -> Result:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(
        prefix="phivault-bench-upload-", dir=os.environ.get("BENCH_DIR")
    ) as workdir:
        work = Path(workdir)
        exam = work / "cine.dcm"
        size = write_exam(exam, size_mib * MIB - 64 * 1024, "1")
        disk_seconds = disk_write_seconds(exam, work / "copy.dcm")
        server = Server(work)
        try:
            home = work / "agent"
            activate(server, home, server.codes(1)[0], server.pin())
            started = time.perf_counter()
            _run(agent_env(home), AGENT, "add", str(exam))
            add_seconds = time.perf_counter() - started
            sampler = RssSampler(server.process.pid)
            began = time.perf_counter()
            report, agent_rss, sync_seconds = sync_with_rss(home)
            ended = time.perf_counter()
            sampler.stop()
            item = report["items"][0]
            server_rss = vm_hwm(server.process.pid)
            server_upload_rss = sampler.peak(began, ended - item["finalize_seconds"])
            concurrent_seconds, errors = concurrent_run(server, work, agents)
        finally:
            server.stop()
        return Result(
            size=size,
            disk_seconds=disk_seconds,
            add_seconds=add_seconds,
            upload_seconds=item["upload_seconds"],
            finalize_seconds=item["finalize_seconds"],
            sync_seconds=sync_seconds,
            agent_rss=agent_rss,
            server_rss=server_rss,
            server_upload_rss=server_upload_rss,
            receipt_status=str(item["receipt_status"]),
            agents=agents,
            concurrent_seconds=concurrent_seconds,
            concurrent_errors=errors,
            load=(load_before, os.getloadavg()[0]),
        )


def report(result: Result, command: str) -> str:
    met = result.ratio >= TARGET_RATIO
    rss_met = result.agent_rss < TARGET_RSS and result.server_rss < TARGET_RSS
    size = result.size / MIB

    def rate(seconds: float) -> str:
        return f"{result.size / seconds / MB:,.0f} MB/s"

    setup = (
        f"One {size:,.0f} MiB ultrasound multi-frame DICOM file through `phivault-agent` to one "
        "`phivault serve` on the same machine (embedded default: SQLite, file object store, local "
        "keyring; TLS 1.3 with the generated certificate, pinned): `add` encrypts it into the spool; "
        "`sync` sends 16 MiB chunks, each with a DPoP proof and a SHA-256 checksum, encrypted into the "
        "object store as they arrive; finalize reads the chunks back, checks the SHA-256 of the whole "
        "and hands the file to the ingest pipeline. The disk figure copies the same file (from the "
        "page cache) to the same disk with a final `fsync`, in the same run. MB = 10^6 bytes. Agent "
        "and server share the machine's cores; the 1-minute load average was "
        f"{result.load[0]:.1f} before the run and {result.load[1]:.1f} after it."
    )
    memory = (
        f"Peak RSS: agent {result.agent_rss / MB:,.0f} MB (`wait4`); server "
        f"{result.server_rss / MB:,.0f} MB (`VmHWM`, from its start through the upload and the "
        f"ingest), of which {result.server_upload_rss / MB:,.0f} MB while the chunks arrived "
        "(`VmRSS` sampled every 50 ms)."
    )
    targets = (
        f"Targets: upload at least {TARGET_RATIO:.0%} of the disk figure: "
        f"{'met' if met else '**missed**'}; agent and server RSS below {TARGET_RSS / MB:.0f} MB: "
        f"{'met' if rss_met else '**missed**'}."
    )
    concurrent = (
        f"**{result.agents} agents syncing at once** (each activated with its own code and key, one "
        f"2 MiB exam each, started together): {len(result.concurrent_errors)} errors, all done in "
        f"{result.concurrent_seconds:.1f} s."
    )
    lines = [
        "## Device uploads (bench/upload.py)",
        "",
        f"`{command}` on {datetime.now(UTC):%Y-%m-%d}; {machine()}.",
        "",
        setup,
        "",
        "| measurement | time | throughput |",
        "|---|---:|---:|",
        f"| raw disk write (copy + fsync) | {result.disk_seconds:.1f} s | {rate(result.disk_seconds)} |",
        (
            f"| **upload** (chunks sent, stored encrypted) | {result.upload_seconds:.1f} s | "
            f"**{rate(result.upload_seconds)}** ({result.ratio:.0%} of the disk) |"
        ),
        (
            f"| finalize (read back, SHA-256, ingest: receipt `{result.receipt_status}`) | "
            f"{result.finalize_seconds:.1f} s | {rate(result.finalize_seconds)} |"
        ),
        (
            f"| `sync` end to end (token, upload, finalize) | {result.sync_seconds:.1f} s | "
            f"{rate(result.sync_seconds)} |"
        ),
        f"| `add` (into the encrypted spool) | {result.add_seconds:.1f} s | {rate(result.add_seconds)} |",
        "",
        memory,
        "",
        targets,
        "",
        concurrent,
    ]
    if result.server_rss >= TARGET_RSS > result.server_upload_rss:
        lines.extend(
            [
                "",
                (
                    "The server's peak belongs to finalize's ingest step (the exams pipeline parses and "
                    "de-identifies the instance in memory); receiving and storing the chunks stays "
                    f"at {result.server_upload_rss / MB:,.0f} MB, flat in the file's size."
                ),
            ]
        )
    lines.extend(f"- {error}" for error in result.concurrent_errors[:10])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    result = run(args.size_mib, args.agents)
    command = (
        f".venv/bin/python bench/upload.py --size-mib {args.size_mib} --agents {args.agents} --write-docs"
    )
    text = report(result, command)
    print(text)
    if args.write_docs:
        write_section("upload.py", text)
    ok = (
        result.ratio >= TARGET_RATIO
        and result.agent_rss < TARGET_RSS
        and result.server_rss < TARGET_RSS
        and not result.concurrent_errors
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
