"""Mixed load: many concurrent clients uploading and querying against one ``phivault serve``.

    .venv/bin/python bench/load.py [--clients 200] [--seconds 60] [--write-docs] [--json FILE]

Starts one ``phivault serve`` (embedded default: SQLite, file object store, local keyring,
the generated TLS certificate) on a free loopback port in a temporary directory. Set-up, in
this process before the server starts: an institution, clinicians (``--password-stdin``
accounts, no MFA due) and one activation code per device. Then, over TLS:

1. the clinicians sign in; the devices activate (a DPoP proof signed by a new Ed25519 key);
2. ``--seed`` studies are stored through STOW-RS, of ``PATIENTS`` made-up patients dated
   over 2025;
3. ``--clients`` clients run for ``--seconds``, each on its own keep-alive connection,
   each sending its next request as soon as the last is answered (no think time: the
   server is saturated on purpose):

   - devices (``--device-share``): tus upload of a 320x240 RGB ultrasound image (create,
     64 KiB PATCH chunks with an ``Upload-Checksum``, finalize), a DPoP proof per request;
   - STOW-RS clinicians (``--stow-share``): one instance per request;
   - readers (the rest), each request one of: QIDO-RS by PatientID, QIDO-RS by a 7-day
     StudyDate range, WADO-RS of a stored instance, the exam list (``/api/v1/exams``).

Reported per operation: requests, 429s (the server's intended refusals, counted apart),
errors by status, latency p50/p95/p99/max; the server's RSS (``VmRSS`` sampled every 0.5 s,
``VmHWM``), its CPU and the client's own (cores used, event-loop lag: whether the client
kept up), the load average before, at the start and after; ERROR lines in the server's log.
An error is any answer other than the expected status (or a 429), a receipt other than
``stored``, or a transport failure (reset, timeout). Exit status 1 if there was any.
``--write-docs`` replaces this benchmark's section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import random
import re
import resource
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import httpx
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset

from perfdoc import git_revision, machine, write_section
from phivault.accounts.permissions import Role
from phivault.agent.keys import DeviceKey
from phivault.audit.service import Actor, SystemSubject
from phivault.config.settings import load_settings
from phivault.runtime import build_runtime, initialise

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers.common import free_port  # noqa: E402  # tests/ is on the path now
from servers.phivault import PhivaultServer, phivault_env  # noqa: E402

PASSWORD: Final = "benchmarks measure what is"  # noqa: S105  # throwaway benchmark accounts
CLINICIANS: Final = 10  # sign-ins are Argon2id at one per core: share ten accounts
PATIENTS: Final = 50
ISSUER: Final = "LOAD-HOSPITAL"
UID_ROOT: Final = "1.2.826.0.1.3680043.10.1444.77"
ROWS, COLUMNS = 240, 320
CHUNK: Final = 64 * 1024
FIRST_DAY: Final = date(2025, 1, 1)
DAYS: Final = 365
BOUNDARY: Final = "phivault-load-boundary-5d2e"
STOW_TYPE: Final = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
DICOM_JSON: Final = {"Accept": "application/dicom+json"}
WADO_ACCEPT: Final = {"Accept": 'multipart/related; type="application/dicom"'}
TUS: Final = {"Tus-Resumable": "1.0.0"}
READS: Final = ("qido PatientID", "qido StudyDate 7 days", "wado instance", "exam list")
OPERATIONS: Final = (
    "upload create",
    "upload chunk",
    "upload finalize",
    "stow instance",
    *READS,
)
SAMPLE_SECONDS: Final = 0.5
# Above these the client, not the server, may be what limits the run.
CLIENT_BUSY_CORES: Final = 0.5
CLIENT_LATE_MS: Final = 50.0
LAG_TICK: Final = 0.05
# The server's access tokens last 15 min (the maximum); no client refreshes them.
TOKEN_SECONDS: Final = 900
MAX_SECONDS: Final = 780
PIXELS: Final = (bytes(range(256)) * (ROWS * COLUMNS * 3 // 256 + 1))[: ROWS * COLUMNS * 3]
ERROR_LINE: Final = re.compile(r"Traceback|\bERROR\b|\"level\": ?\"error\"|\bCRITICAL\b")


def _seeded(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311  # reproducible made-up data, not secrets


# -- the data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exam:
    study: str
    series: str
    sop: str
    patient_id: str
    body: bytes


class Exams:
    """Made-up ultrasound instances, each a new study of one of ``PATIENTS`` patients."""

    def __init__(self, seed: int) -> None:
        self.rng = _seeded(seed)
        self.serial = 0
        self.stored: list[Exam] = []  # what the readers may retrieve (answered ``stored``)

    def next(self) -> Exam:
        self.serial += 1
        patient = self.rng.randrange(PATIENTS)
        study = f"{UID_ROOT}.{self.serial}"
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = dicom_uid.UltrasoundImageStorage
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, f"{study}.1", f"{study}.1.1"
        ds.PatientName = f"Loadtest^Patient{patient:03d}"
        ds.PatientID = f"LOAD-{patient:05d}"
        ds.IssuerOfPatientID = ISSUER
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "FO"[patient % 2]
        ds.StudyDate = (FIRST_DAY + timedelta(days=self.rng.randrange(DAYS))).strftime("%Y%m%d")
        ds.StudyTime = "101500"
        ds.AccessionNumber = f"LACC{self.serial:07d}"
        ds.StudyID = "1"
        ds.Modality = "US"
        ds.Manufacturer = "Bench Sonics"
        ds.ManufacturerModelName = "L-1"
        ds.SeriesNumber = ds.InstanceNumber = 1
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = PIXELS
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return Exam(study, f"{study}.1", f"{study}.1.1", ds.PatientID, buffer.getvalue())


def stow_body(exam: Exam) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return head + exam.body + f"\r\n--{BOUNDARY}--\r\n".encode()


# -- measuring --------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Operation:
    name: str
    latencies: list[float] = field(default_factory=list)  # ms, every answered request
    outcomes: Counter[str] = field(default_factory=Counter)  # "ok", "429", "500", "ReadTimeout" …
    samples: list[str] = field(default_factory=list)  # the first few errors, for the report

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def throttled(self) -> int:
        return self.outcomes["429"]

    @property
    def errors(self) -> dict[str, int]:
        return {key: count for key, count in self.outcomes.items() if key not in ("ok", "429")}


class Recorder:
    def __init__(self) -> None:
        self.operations = {name: Operation(name) for name in OPERATIONS}
        self.nonce_retries = 0
        self.measuring = False  # set-up requests are not counted

    async def call(
        self,
        name: str,
        send: Callable[[], Awaitable[httpx.Response]],
        expected: int,
        check: Callable[[httpx.Response], str | None] | None = None,
    ) -> httpx.Response | None:
        """Send one request and file its outcome; None when it failed (the caller stops
        that sequence: an upload whose chunk failed is not finalized).
        """
        started = time.perf_counter()
        try:
            response = await send()
        except httpx.HTTPError as exc:
            self._file(name, None, type(exc).__name__, f"{type(exc).__name__}: {exc}"[:300])
            return None
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code == expected:
            problem = check(response) if check is not None else None
            outcome, detail = ("ok", "") if problem is None else (problem, problem)
        elif response.status_code == 429:  # the server's intended refusal
            outcome, detail = "429", ""
        else:
            outcome = str(response.status_code)
            detail = f"{response.status_code} {response.text[:300]}"
        self._file(name, elapsed, outcome, detail)
        return response if outcome == "ok" else None

    def _file(self, name: str, elapsed: float | None, outcome: str, detail: str) -> None:
        if not self.measuring:
            if outcome != "ok":
                msg = f"set-up request {name} failed: {detail}"
                raise RuntimeError(msg)
            return
        operation = self.operations[name]
        operation.outcomes[outcome] += 1
        if elapsed is not None:
            operation.latencies.append(elapsed)
        if detail and len(operation.samples) < 5:
            operation.samples.append(detail)


# -- clients ----------------------------------------------------------------------------------


@dataclass
class Target:
    base_url: str
    context: ssl.SSLContext

    def client(self, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
        """One client's own keep-alive connection (a real client is its own TCP peer)."""
        return httpx.AsyncClient(
            base_url=self.base_url,
            verify=self.context,
            headers=headers,
            timeout=httpx.Timeout(120.0, connect=30.0),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )


@dataclass
class Device:
    """An activated device: its key, its DPoP-bound token and the server's latest nonce."""

    key: DeviceKey
    recorder: Recorder  # counts the nonce challenges
    token: str = ""
    nonce: str | None = None

    async def send(  # a request's parts
        self,
        http: httpx.AsyncClient,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        body: Any = None,  # noqa: ANN401  # a JSON body
        authenticated: bool = True,
    ) -> httpx.Response:
        """One request with a fresh proof, sent again once when the server asks for a nonce
        (RFC 9449 §8), as the agent does; the challenge is counted, not an error.
        """
        url = f"{http.base_url}".rstrip("/") + path
        for _attempt in range(2):
            token = self.token if authenticated else None
            sent = dict(headers or {})
            sent["DPoP"] = self.key.proof(method, url, token=token, nonce=self.nonce)
            if token is not None:
                sent["Authorization"] = f"DPoP {token}"
            response = await http.request(method, path, headers=sent, content=content, json=body)
            if "dpop-nonce" in response.headers:
                self.nonce = response.headers["dpop-nonce"]
            if response.status_code == 401 and _problem_code(response) == "use_dpop_nonce":
                self.recorder.nonce_retries += 1
                continue
            return response
        return response


def _problem_code(response: httpx.Response) -> str | None:
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return None
    try:
        code = response.json().get("code")
    except ValueError:
        return None
    return code if isinstance(code, str) else None


def _receipt_stored(response: httpx.Response) -> str | None:
    status = response.json().get("status")
    return None if status == "stored" else f"receipt {status}"


def _stow_stored(response: httpx.Response) -> str | None:
    # PS3.18 §10.5.3: a Failed SOP Sequence in a 200 answer would be a partial failure.
    return "stow failed instances" if "00081198" in response.json() else None


async def upload(recorder: Recorder, http: httpx.AsyncClient, device: Device, exam: Exam) -> bool:
    """One tus 1.0 upload: create, PATCH every chunk, finalize; True if the receipt says stored."""
    data = exam.body
    headers = {**TUS, "Upload-Length": str(len(data))}
    created = await recorder.call(
        "upload create", lambda: device.send(http, "POST", "/api/v1/uploads", headers=headers), 201
    )
    if created is None:
        return False
    path = "/api/v1/uploads/" + created.json()["id"]
    for start in range(0, len(data), CHUNK):
        chunk = data[start : start + CHUNK]
        chunk_headers = {
            **TUS,
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": str(start),
            "Upload-Checksum": "sha256 " + base64.b64encode(hashlib.sha256(chunk).digest()).decode(),
        }

        def patch(chunk_headers: dict[str, str] = chunk_headers, chunk: bytes = chunk) -> Any:  # noqa: ANN401
            return device.send(http, "PATCH", path, headers=chunk_headers, content=chunk)

        if await recorder.call("upload chunk", patch, 204) is None:
            return False
    digest = {"sha256": hashlib.sha256(data).hexdigest()}
    finalized = await recorder.call(
        "upload finalize",
        lambda: device.send(http, "POST", path + "/finalize", body=digest),
        200,
        _receipt_stored,
    )
    return finalized is not None


async def stow(recorder: Recorder, http: httpx.AsyncClient, exam: Exam) -> bool:
    headers = {"Content-Type": STOW_TYPE, **DICOM_JSON}
    body = stow_body(exam)
    answer = await recorder.call(
        "stow instance",
        lambda: http.post("/dicomweb/studies", content=body, headers=headers),
        200,
        _stow_stored,
    )
    return answer is not None


async def read(
    recorder: Recorder, http: httpx.AsyncClient, kind: str, rng: random.Random, exams: Exams
) -> None:
    if kind == "qido PatientID":
        url = f"/dicomweb/studies?PatientID=LOAD-{rng.randrange(PATIENTS):05d}&limit=25"
        await recorder.call(kind, lambda: http.get(url, headers=DICOM_JSON), 200)
    elif kind == "qido StudyDate 7 days":
        start = FIRST_DAY + timedelta(days=rng.randrange(DAYS - 7))
        span = f"{start:%Y%m%d}-{start + timedelta(days=6):%Y%m%d}"
        url = f"/dicomweb/studies?StudyDate={span}&limit=25"
        await recorder.call(kind, lambda: http.get(url, headers=DICOM_JSON), 200)
    elif kind == "wado instance":
        exam = rng.choice(exams.stored)
        url = f"/dicomweb/studies/{exam.study}/series/{exam.series}/instances/{exam.sop}"
        await recorder.call(kind, lambda: http.get(url, headers=WADO_ACCEPT), 200)
    else:
        await recorder.call(kind, lambda: http.get("/api/v1/exams?limit=25"), 200)


@dataclass(frozen=True)
class Mix:
    devices: int
    stow: int
    readers: int

    @classmethod
    def of(cls, clients: int, device_share: float, stow_share: float) -> Mix:
        devices = max(1, round(clients * device_share))
        stowers = max(1, round(clients * stow_share))
        return cls(devices, stowers, max(1, clients - devices - stowers))

    @property
    def clients(self) -> int:
        return self.devices + self.stow + self.readers


# -- the server and its numbers ---------------------------------------------------------------


def proc_status(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, all its threads: utime + stime (proc(5), fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Result:
    clients: int
    seconds: float
    mix: Mix
    seed: int
    operations: dict[str, Operation]
    elapsed: float
    uploads_stored: int
    stow_stored: int
    nonce_retries: int
    rss_samples: list[int]
    rss_start: int
    hwm: int
    server_cpu: float
    client_cpu: float
    lag_ms: list[float]
    load_before: tuple[float, float, float]
    load_start: tuple[float, float, float]
    load_after: tuple[float, float, float]
    log_errors: list[str]
    setup_seconds: float

    @property
    def errors(self) -> int:
        return sum(sum(operation.errors.values()) for operation in self.operations.values())

    @property
    def requests(self) -> int:
        return sum(operation.requests for operation in self.operations.values())

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "requests": self.requests,
            "errors": self.errors,
            "throttled": sum(operation.throttled for operation in self.operations.values()),
            "operations": {
                name: {
                    "requests": operation.requests,
                    "throttled": operation.throttled,
                    "errors": operation.errors,
                    "samples": operation.samples,
                    "p50_ms": percentile(operation.latencies, 0.50),
                    "p95_ms": percentile(operation.latencies, 0.95),
                    "p99_ms": percentile(operation.latencies, 0.99),
                }
                for name, operation in self.operations.items()
            },
            "server_vmhwm": self.hwm,
            "server_peak_vmrss": max(self.rss_samples, default=0),
            "server_log_errors": self.log_errors[:20],
        }


def set_up_accounts(data_dir: Path, devices: int) -> tuple[list[str], list[str]]:
    """The institution, clinicians and activation codes, in this process before the server
    starts (a CLI call each would cost a process start and a migration check).
    """
    settings = load_settings(data_dir=data_dir)
    runtime = build_runtime(settings)
    try:
        initialise(runtime)
        system = SystemSubject(Actor.system("bench-load"))
        institution = runtime.accounts.create_institution(system, "Load Test Clinic").id
        emails = []
        for index in range(CLINICIANS):
            email = f"clinician{index}@load.example"
            runtime.accounts.create_user(
                system, institution_id=institution, email=email, role=Role.CLINICIAN, password=PASSWORD
            )
            emails.append(email)
        codes = [runtime.devices.create_code(system, institution).code for _ in range(devices)]
    finally:
        runtime.close()
    return emails, codes


async def sign_in(target: Target, emails: list[str]) -> list[str]:
    async with target.client() as http:
        tokens = []
        for email in emails:
            answer = await http.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
            answer.raise_for_status()
            tokens.append(answer.json()["access_token"])
    return tokens


async def activate(recorder: Recorder, target: Target, code: str) -> Device:
    device = Device(DeviceKey.generate(), recorder)
    async with target.client() as http:
        answer = await device.send(
            http, "POST", "/api/v1/devices/activate", body={"code": code}, authenticated=False
        )
    if answer.status_code != 200:
        msg = f"activation failed: {answer.status_code} {answer.text[:300]}"
        raise RuntimeError(msg)
    device.token = answer.json()["access_token"]
    return device


class LoadRun:
    """The clients of one run and what they share: the recorder, the exams, the deadline."""

    def __init__(self, target: Target, recorder: Recorder, tokens: list[str]) -> None:
        self.target = target
        self.recorder = recorder
        self.tokens = tokens
        self.exams = Exams(seed=11)
        self.deadline = 0.0
        self.uploads = 0
        self.stowed = 0

    def bearer(self, index: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[index % len(self.tokens)]}"}

    async def seed(self, count: int) -> None:
        """Studies stored before the clients start: the readers need some from the first request."""
        async with self.target.client(self.bearer(0)) as http:
            for _ in range(count):
                exam = self.exams.next()
                if await stow(self.recorder, http, exam):
                    self.exams.stored.append(exam)

    async def device(self, device: Device) -> None:
        async with self.target.client() as http:
            while time.monotonic() < self.deadline:
                exam = self.exams.next()
                if await upload(self.recorder, http, device, exam):
                    self.exams.stored.append(exam)
                    self.uploads += 1

    async def stower(self, index: int) -> None:
        async with self.target.client(self.bearer(index)) as http:
            while time.monotonic() < self.deadline:
                exam = self.exams.next()
                if await stow(self.recorder, http, exam):
                    self.exams.stored.append(exam)
                    self.stowed += 1

    async def reader(self, index: int) -> None:
        rng = _seeded(index)
        async with self.target.client(self.bearer(index)) as http:
            while time.monotonic() < self.deadline:
                await read(self.recorder, http, rng.choice(READS), rng, self.exams)


class Monitor:
    """The server's ``VmRSS`` every ``SAMPLE_SECONDS`` and this client's event-loop lag: when
    the client's own loop is busy, its timers fire late, its latencies include its own
    queueing, and the server is not what is measured.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss: list[int] = []
        self.lag_ms: list[float] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._sample_rss()), asyncio.create_task(self._watch_loop())]

    async def _sample_rss(self) -> None:
        while not self._stop.is_set():
            self.rss.append(proc_status(self.pid, "VmRSS"))
            await asyncio.sleep(SAMPLE_SECONDS)

    async def _watch_loop(self) -> None:
        while not self._stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(LAG_TICK)
            self.lag_ms.append((time.perf_counter() - before - LAG_TICK) * 1000)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def prepare_and_load(
    server: PhivaultServer, emails: list[str], codes: list[str], args: argparse.Namespace
) -> Result:
    assert server.process is not None  # noqa: S101  # started by the caller
    pid = server.process.pid
    target = Target(server.base_url, ssl.create_default_context(cafile=str(server.ca_file)))
    recorder = Recorder()
    tokens = await sign_in(target, emails)
    devices = list(await asyncio.gather(*(activate(recorder, target, code) for code in codes)))
    run = LoadRun(target, recorder, tokens)
    await run.seed(args.seed)
    mix: Mix = args.mix

    load_start = os.getloadavg()
    rss_start = proc_status(pid, "VmRSS")
    server_cpu, client_cpu = cpu_seconds(pid), own_cpu_seconds()
    recorder.measuring, recorder.nonce_retries = True, 0
    monitor = Monitor(pid)
    began = time.perf_counter()
    run.deadline = time.monotonic() + args.seconds
    clients = [run.device(device) for device in devices]
    clients += [run.stower(index) for index in range(mix.stow)]
    clients += [run.reader(index) for index in range(mix.readers)]
    await asyncio.gather(*clients)
    elapsed = time.perf_counter() - began
    server_cpu, client_cpu = cpu_seconds(pid) - server_cpu, own_cpu_seconds() - client_cpu
    await monitor.stop()
    return Result(
        clients=mix.clients,
        seconds=args.seconds,
        mix=mix,
        seed=args.seed,
        operations=recorder.operations,
        elapsed=elapsed,
        uploads_stored=run.uploads,
        stow_stored=run.stowed,
        nonce_retries=recorder.nonce_retries,
        rss_samples=monitor.rss,
        rss_start=rss_start,
        hwm=proc_status(pid, "VmHWM"),
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        lag_ms=monitor.lag_ms,
        load_before=(0.0, 0.0, 0.0),
        load_start=load_start,
        load_after=os.getloadavg(),
        log_errors=[],
        setup_seconds=0.0,
    )


def run(args: argparse.Namespace) -> Result:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="phivault-bench-load-", dir=os.environ.get("BENCH_DIR")) as work:
        data_dir = Path(work) / "data"
        started = time.perf_counter()
        emails, codes = set_up_accounts(data_dir, args.mix.devices)
        port = free_port()
        env = phivault_env(
            data_dir, public_url=f"https://127.0.0.1:{port}", access_token_seconds=str(TOKEN_SECONDS)
        )
        server = PhivaultServer(data_dir, port=port, env=env)
        server.start()
        try:
            result = asyncio.run(prepare_and_load(server, emails, codes, args))
        finally:
            server.terminate()
        result.setup_seconds = time.perf_counter() - started - result.elapsed
        result.load_before = load_before
        output = server.output()
        result.log_errors = [line for line in output.splitlines() if ERROR_LINE.search(line)]
        if args.server_log is not None:
            args.server_log.write_text(output)
    return result


# -- the report -------------------------------------------------------------------------------


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.1f}" for value in values)


def render(result: Result, command: str) -> str:
    mib = 1024 * 1024
    cores = os.cpu_count() or 1
    met = result.errors == 0
    throttled = sum(operation.throttled for operation in result.operations.values())
    setup = (
        f"{result.clients} clients against one `phivault serve` on the same machine (embedded "
        "default: SQLite, file object store, local keyring; TLS 1.3 with the generated "
        "certificate, HTTP/1.1 keep-alive, one connection per client), for "
        f"{result.seconds:.0f} s, each sending its next request as soon as the last is answered "
        f"(no think time: the server is saturated on purpose). **{result.mix.devices} devices** "
        f"upload a {COLUMNS}x{ROWS} RGB ultrasound image ({len(PIXELS) / 1000:.0f} kB) each "
        f"time through tus (create, {CHUNK // 1024} KiB chunks each with an `Upload-Checksum`, "
        "finalize into ingest), a DPoP proof on every request; **"
        f"{result.mix.stow} clinicians** store one instance per STOW-RS request; **"
        f"{result.mix.readers} clinicians** read, each request one of QIDO-RS by PatientID, "
        "QIDO-RS by a 7-day StudyDate range, WADO-RS of a stored instance, the exam list "
        f"(`/api/v1/exams?limit=25`). {result.seed} studies of {PATIENTS} patients were "
        f"stored first; {CLINICIANS} clinician accounts are shared by the clinician clients. "
        "Every instance is de-identified, blanked, encrypted and audited; every read is "
        "authorised, PHI re-attached and audited."
    )
    machine_load = (
        f"Load average (1/5/15 min) {_load(result.load_before)} before the run, "
        f"{_load(result.load_start)} as the clients started and {_load(result.load_after)} "
        f"after them, on {cores} cores: above about {cores} other work shared the cores."
    )
    rows = [
        "| operation | requests | 429 (intended) | errors | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    all_latencies: list[float] = []
    for operation in result.operations.values():
        all_latencies += operation.latencies
        errors = ", ".join(f"{count} x {key}" for key, count in sorted(operation.errors.items())) or "0"
        rows.append(
            f"| {operation.name} | {operation.requests:,} | {operation.throttled} | {errors} | "
            f"{percentile(operation.latencies, 0.5):.0f} | {percentile(operation.latencies, 0.95):.0f} | "
            f"{percentile(operation.latencies, 0.99):.0f} | {max(operation.latencies, default=0):.0f} |"
        )
    rows.append(
        f"| **all** | {result.requests:,} | {throttled} | {result.errors} | "
        f"{percentile(all_latencies, 0.5):.0f} | {percentile(all_latencies, 0.95):.0f} | "
        f"**{percentile(all_latencies, 0.99):.0f}** | {max(all_latencies, default=0):.0f} |"
    )
    throughput = (
        f"{result.requests / result.elapsed:,.0f} requests/s over {result.elapsed:.1f} s (requests "
        "begun before the deadline were let finish); "
        f"{result.uploads_stored:,} device uploads and {result.stow_stored:,} STOW-RS instances "
        f"stored ({(result.uploads_stored + result.stow_stored) / result.elapsed:.1f} instances/s); "
        f"{result.nonce_retries} DPoP nonce challenges answered (RFC 9449 §8, not errors). Set-up "
        f"(accounts, server start, sign-ins, activations, seeding) took {result.setup_seconds:.0f} s."
    )
    peak = max(result.rss_samples, default=0)
    memory = (
        f"Server memory: `VmRSS` {result.rss_start / mib:,.0f} MiB as the clients started, "
        f"peak {peak / mib:,.0f} MiB and {result.rss_samples[-1] / mib if result.rss_samples else 0:,.0f} "
        f"MiB at the end (sampled every {SAMPLE_SECONDS} s); `VmHWM` {result.hwm / mib:,.0f} MiB "
        "(from its start, seeding included)."
    )
    lag = percentile(result.lag_ms, 0.99)
    client_cores = result.client_cpu / result.elapsed
    if client_cores >= CLIENT_BUSY_CORES:
        why = ": the client was busy itself and its latencies include its own queueing."
    elif lag >= CLIENT_LATE_MS:
        why = (
            ": it used little CPU, so its timers were late because the machine's cores were "
            "taken (see the load average), not because of its own work; latencies include that."
        )
    else:
        why = ", so the client was not the bottleneck."
    cpu = (
        f"CPU during the run: server {result.server_cpu / result.elapsed:.2f} cores, this "
        f"benchmark's client (one asyncio process) {client_cores:.2f} cores; the client's event "
        f"loop ran its timers {lag:.1f} ms late at p99 (max {max(result.lag_ms, default=0):.0f} ms)" + why
    )
    log_note = f"The server's log has {len(result.log_errors)} ERROR/Traceback lines" + (
        ":" if result.log_errors else "."
    )
    verdict = (
        f"Target: 0 errors other than intended 429s: {'met' if met else '**missed**'} "
        f"({result.errors} errors, {throttled} 429s)."
    )
    limits = (
        "The server's limits that apply: at most `PHIVAULT_HTTP_MAX_CONNECTIONS` (1000) connections "
        "and requests in progress, beyond which uvicorn answers 503; request headers within "
        "`PHIVAULT_HTTP_HEADER_TIMEOUT_SECONDS` (10 s); idle keep-alive connections closed after 5 s; "
        "sync routes run in AnyIO's thread pool (40 threads), the rest wait on the event loop; "
        "SQLite writers queue on a 30 s busy timeout. No route used here is rate-limited (429 is "
        "for failed sign-ins and share passcodes), so no 429 is expected. Every read writes its "
        "audit records in the transaction that reads, and authenticating a request opens a write "
        "transaction too (it may touch the session or record the DPoP proof), so every request "
        "queues, with the uploads, for the main database's one write lock: with no think time "
        "that queue is most of the latency."
    )
    lines = [
        f"## Mixed load: {result.clients} clients (bench/load.py)",
        "",
        f"`{command}` on {datetime.now(UTC):%Y-%m-%d} at {git_revision()}; {machine()}.",
        "",
        setup,
        "",
        machine_load,
        "",
        *rows,
        "",
        throughput,
        "",
        memory,
        "",
        cpu,
        "",
        verdict,
        "",
        limits,
        "",
        log_note,
    ]
    lines += [f"    {line[:200]}" for line in result.log_errors[:10]]
    samples = [(name, sample) for name, op in result.operations.items() for sample in op.samples]
    if samples:
        lines += ["", "First errors seen, per operation:", ""]
        lines += [f"- {name}: `{sample[:200]}`" for name, sample in samples[:15]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--device-share", type=float, default=0.2, help="of the clients, devices")
    parser.add_argument("--stow-share", type=float, default=0.1, help="of the clients, STOW-RS")
    parser.add_argument("--seed", type=int, default=40, help="studies stored before the run")
    parser.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    parser.add_argument("--json", type=Path, help="also write a summary here (for the test)")
    parser.add_argument("--server-log", type=Path, help="keep a copy of the server's log here")
    args = parser.parse_args()
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS}]: clinician tokens are not refreshed")
    if args.seed < 1:
        parser.error("--seed must be at least 1: the readers retrieve stored instances")
    args.mix = Mix.of(args.clients, args.device_share, args.stow_share)
    result = run(args)
    command = f".venv/bin/python bench/load.py --clients {args.clients} --seconds {args.seconds:g}"
    if args.write_docs:
        command += " --write-docs"
    text = render(result, command)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(result.summary(), indent=2))
    if args.write_docs:
        write_section("load.py", text)
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
