"""Ingest throughput: the same generated exams into phivault (STOW-RS over TLS, with
de-identification, encryption and audit) and into Orthanc (its DICOMweb plugin), in the same
run, with 1 and 4 parallel clients.

    .venv/bin/python bench/ingest.py [--instances 1000] [--cines 10] [--frames 120]
                                     [--clients 1,4] [--write-docs]

The dataset: ``--instances`` ultrasound images of 640x480 RGB and ``--cines`` multi-frame
ultrasound loops of ``--frames`` frames, made-up patients, uncompressed (Explicit VR Little
Endian), written once to a temporary directory. Each client thread posts one instance per
STOW-RS request (``multipart/related; type="application/dicom"``), as a device would.

Every run starts from an empty server: phivault ``serve`` on the embedded default (SQLite,
file store, local keyring) in a fresh data directory, signed in as a clinician; Orthanc
(Debian packages ``orthanc`` and ``orthanc-dicomweb``) with fresh storage over plain HTTP on
loopback. Target: phivault >= 1.0x Orthanc's instances/s. Exit status 1 if missed.
``--write-docs`` replaces this benchmark's section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from perfdoc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers.orthanc import OrthancServer  # noqa: E402
from servers.phivault import PhivaultServer, phivault_env  # noqa: E402

PHIVAULT = str(Path(sys.executable).with_name("phivault"))
PASSWORD = "benchmarks measure what is"  # noqa: S105  # a throwaway benchmark user
BOUNDARY = "phivault-bench-boundary"
ROWS, COLUMNS = 480, 640
TARGET_RATIO = 1.0


@dataclass(frozen=True)
class Run:
    target: str
    clients: int
    instances: int
    megabytes: float
    seconds: float
    failures: int

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds


def _instance(path: Path, patient: int, study_uid: str, series_uid: str, frames: int, number: int) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage if frames > 1 else UltrasoundImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "US"
    ds.Manufacturer = "Bench Sonics"
    ds.ManufacturerModelName = "B-1"
    ds.PatientName = f"Benchmark^Patient{patient:04d}"
    ds.PatientID = f"BENCH-{patient:06d}"
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20260101"
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063
        ds.FrameTime = 33.3
    rng = np.random.default_rng(number + patient * 7919)
    frame = rng.integers(0, 255, size=(ROWS, COLUMNS, 3), dtype=np.uint8)
    ds.PixelData = np.concatenate([np.roll(frame, i, axis=1) for i in range(frames)]).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def generate(directory: Path, images: int, cines: int, frames: int) -> list[Path]:
    """``images`` single-frame and ``cines`` multi-frame instances; 20 images per study."""
    paths = []
    for n in range(images):
        if n % 20 == 0:
            study, series = generate_uid(), generate_uid()
        path = directory / f"image-{n:05d}.dcm"
        _instance(path, n // 20, study, series, 1, n % 20 + 1)
        paths.append(path)
    for n in range(cines):
        path = directory / f"cine-{n:03d}.dcm"
        _instance(path, 10_000 + n, generate_uid(), generate_uid(), frames, 1)
        paths.append(path)
    return paths


def _body(path: Path) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return head + path.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()


def upload(
    paths: list[Path], clients: int, make_client: Callable[[], httpx.Client], url: str, target: str
) -> Run:
    queue = list(reversed(paths))
    lock = threading.Lock()
    failures: list[str] = []
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}

    def worker() -> None:
        with make_client() as client:
            while True:
                with lock:
                    if not queue:
                        return
                    path = queue.pop()
                try:
                    answer = client.post(url, content=_body(path), headers=headers)
                except httpx.TransportError as exc:  # counted, not retried: the server dropped it
                    with lock:
                        failures.append(f"{path.name}: {type(exc).__name__} {exc}")
                    continue
                if answer.status_code != 200:
                    with lock:
                        failures.append(f"{path.name}: {answer.status_code} {answer.text[:200]}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    for failure in failures[:5]:
        print(f"  {target}: {failure}", file=sys.stderr)
    megabytes = sum(path.stat().st_size for path in paths) / 1e6
    return Run(target, clients, len(paths) - len(failures), megabytes, seconds, len(failures))


def _cli(env: dict[str, str], *args: str, stdin: str = "") -> dict[str, str]:
    done = subprocess.run(  # our own CLI, fixed arguments
        [PHIVAULT, *args, "--json"], env=env, input=stdin, capture_output=True, text=True, check=True
    )
    result: dict[str, str] = json.loads(done.stdout)
    return result


def run_phivault(paths: list[Path], clients: int) -> Run:
    with tempfile.TemporaryDirectory(prefix="phivault-bench-ingest-") as tmp:
        data_dir = Path(tmp) / "data"
        # The longest access token allowed (15 minutes) outlasts a run.
        env = phivault_env(data_dir, access_token_seconds="900")  # noqa: S106  # a lifetime, not a secret
        institution = _cli(env, "institution", "create", "Benchmark Hospital")["id"]
        email = "clinician@bench.example"
        _cli(
            env,
            "user",
            "create",
            "--institution",
            institution,
            "--email",
            email,
            "--role",
            "clinician",
            "--password-stdin",
            stdin=PASSWORD + "\n",
        )
        server = PhivaultServer(data_dir, env=env)
        server.start()
        try:
            with server.client() as client:
                login = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
                token = login.raise_for_status().json()["access_token"]
            context = ssl.create_default_context(cafile=server.ca_file)

            def make_client() -> httpx.Client:
                return httpx.Client(
                    base_url=server.base_url,
                    verify=context,
                    timeout=600,
                    headers={"Authorization": f"Bearer {token}"},
                )

            return upload(paths, clients, make_client, "/dicomweb/studies", "phivault")
        finally:
            server.terminate()


def run_orthanc(paths: list[Path], clients: int) -> Run:
    with OrthancServer() as orthanc:

        def make_client() -> httpx.Client:
            return httpx.Client(base_url=orthanc.url, auth=orthanc.auth, timeout=600)

        result = upload(paths, clients, make_client, "/dicom-web/studies", "orthanc")
        stored = orthanc.instance_count()
        if stored != result.instances:
            print(f"  orthanc stored {stored} of {result.instances} acknowledged instances", file=sys.stderr)
        return result


def report(runs: list[Run], args: argparse.Namespace, dataset_mb: float) -> tuple[str, bool]:
    lines = [
        "## Ingest (bench/ingest.py)",
        "",
        (
            f"`.venv/bin/python bench/ingest.py --instances {args.instances} --cines {args.cines} "
            f"--frames {args.frames} --clients {args.clients}` on {datetime.now(UTC):%Y-%m-%d}, {machine()}."
        ),
        "",
        (
            f"Dataset: {args.instances} ultrasound images 640x480 RGB and {args.cines} cine loops of "
            f"{args.frames} frames, uncompressed, {dataset_mb:.0f} MB; one instance per STOW-RS request. "
            "phivault: `serve` on the embedded default (SQLite, file store, local keyring) over TLS 1.3, "
            "de-identifying, blanking the ultrasound banner, encrypting and auditing every instance. "
            "Orthanc 1.10 (Debian) with its DICOMweb plugin over plain HTTP on loopback, default "
            "SQLite index, no compression. Both from empty storage, client and server on the same machine."
        ),
        "",
        "| clients | server | instances/s | MB/s | failures | phivault / Orthanc |",
        "|---|---|---|---|---|---|",
    ]
    met = True
    for clients in sorted({run.clients for run in runs}):
        pair = {run.target: run for run in runs if run.clients == clients}
        ratio = pair["phivault"].per_second / pair["orthanc"].per_second
        met = met and ratio >= TARGET_RATIO and not any(run.failures for run in pair.values())
        for target in ("orthanc", "phivault"):
            run = pair[target]
            lines.append(
                f"| {clients} | {target} | {run.per_second:.1f} | {run.mb_per_second:.1f} | {run.failures} | "
                + (f"{ratio:.2f}x |" if target == "phivault" else "|")
            )
    lines += [
        "",
        f"Target: phivault >= {TARGET_RATIO:.1f}x Orthanc's throughput: {'met' if met else 'NOT met'}.",
    ]
    return "\n".join(lines), met


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--cines", type=int, default=10)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="phivault-bench-dataset-") as tmp:
        print("generating the dataset …", file=sys.stderr)
        paths = generate(Path(tmp), args.instances, args.cines, args.frames)
        dataset_mb = sum(path.stat().st_size for path in paths) / 1e6
        for clients in (int(c) for c in args.clients.split(",")):
            for target, runner in (("orthanc", run_orthanc), ("phivault", run_phivault)):
                print(f"{target}, {clients} client(s) …", file=sys.stderr)
                run = runner(paths, clients)
                print(f"  {run.per_second:.1f} instances/s, {run.mb_per_second:.1f} MB/s", file=sys.stderr)
                runs.append(run)
    text, met = report(runs, args, dataset_mb)
    print(text)
    if args.write_docs:
        write_section("ingest.py", text)
    return 0 if met else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
