"""Query and frame latency: QIDO-RS searches over 100 000 indexed studies on PostgreSQL and
WADO-RS frame 60 of a 120-frame cine, phivault beside Orthanc loaded with the same data in
the same run.

    .venv/bin/python bench/query.py [--studies 100000] [--patients 40000] [--queries 200]
                                    [--limit 25] [--skip-orthanc] [--write-docs]

The dataset (made-up, seeded): ``--patients`` patients with generated names and PatientIDs
of one issuer; ``--studies`` studies spread over them, dated over ten years, one accession
number each; and one real ultrasound cine of 120 frames (640x480 RGB, uncompressed).

phivault: a throwaway PostgreSQL 15 (tests/servers/postgres.py, fsync off) holds both
databases. The studies are written the way ingest writes them, in bulk and in-process: a key
per patient, sealed PHI (patient, study record), blind indexes (PatientID + issuer,
accession, study date), the name and PatientID tokens (exams/name_index.py), and the
de-identified index rows (a study, a series and an instance each; instance PHI documents and
objects are left out, study-level searches do not read them). The cine goes through the real
ingest pipeline. Then ``phivault serve`` answers over TLS as a clinician (``phi:read``):
PHI is matched by blind index and decrypted for the answers, every search is audited.

Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, default SQLite index) gets one small
instance per study with the same patient, dates, accession and Study Instance UID, and the
same cine, over its REST API; it answers over plain HTTP on loopback.

Queries, ``--queries`` of each after a warm-up, one client, ``limit=--limit``:
PatientID (exact, existing), PatientName (the first five letters of an existing family name
and ``*``), StudyDate (a random seven-day range); and WADO-RS frame 60 of the cine
(``multipart/related; type="application/octet-stream"``). Target: phivault p95 <= Orthanc's
and < 50 ms. Exit status 1 if missed. ``--write-docs`` replaces this benchmark's section of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    UltrasoundMultiFrameImageStorage,
)
from sqlalchemy import insert

from perfdoc import machine, write_section
from phivault.audit.service import Actor, SystemSubject
from phivault.config.settings import load_settings
from phivault.dicom.phi import PhiRecord
from phivault.dicom.uids import remap_uid
from phivault.exams.models import Instance, Series, Study
from phivault.exams.name_index import patient_tokens
from phivault.exams.phi_models import PhiPatient, PhiPatientToken, PhiStudy
from phivault.exams.phi_store import field_aad, patient_index
from phivault.exams.types import IngestChannel, IngestOrigin
from phivault.ids import new_id
from phivault.runtime import Runtime, build_runtime, initialise

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers.orthanc import OrthancServer, OrthancUnavailable  # noqa: E402
from servers.phivault import PhivaultServer  # noqa: E402
from servers.postgres import PostgresServer  # noqa: E402

PHIVAULT = str(Path(sys.executable).with_name("phivault"))
PASSWORD = "benchmarks measure what is"  # noqa: S105  # a throwaway benchmark user
ISSUER = "BENCH-HOSPITAL"
UID_ROOT = "1.2.826.0.1.3680043.10.1444.9"
CINE_FRAMES, CINE_ROWS, CINE_COLUMNS = 120, 480, 640
FIRST_DAY = date(2016, 1, 1)
DAYS = 3650
BATCH = 1000
TARGET_MS = 50.0
LOAD: list[float] = []  # the 1-minute load average as each server's queries begin
_SYLLABLES: tuple[str, ...] = ("ka", "lo", "ve", "ran", "dor", "mi", "sel", "tha", "qu", "ix", "wor", "bel")
_SYLLABLES += ("an", "tos", "ri", "fen", "gal", "mar", "lin", "od", "ur", "es", "ba", "zel", "phi", "gri")
_SYLLABLES += ("mon", "ter", "va", "nu", "sho", "kel", "dra", "pen", "wil", "ast", "hol")
_GIVEN: tuple[str, ...] = ("Ada", "Ben", "Cleo", "Dov", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai")
_GIVEN += ("Lea", "Milo", "Nia", "Otto", "Pia", "Quin", "Rhea", "Sam", "Tia", "Uma", "Vic", "Wren", "Zed")


def _seeded(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311  # reproducible made-up data, not secrets


@dataclass(frozen=True)
class PatientRow:
    name: str
    patient_id: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class StudyRow:
    uid: str
    patient: int
    day: date
    accession: str


@dataclass(frozen=True)
class Dataset_:  # noqa: N801  # the benchmark's data set, not a pydicom Dataset
    patients: list[PatientRow]
    studies: list[StudyRow]


def family_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()


def generate(studies: int, patients: int, seed: int = 7) -> Dataset_:
    rng = _seeded(seed)
    people = [
        PatientRow(
            f"{family_name(rng)}^{rng.choice(_GIVEN)}",
            f"PID{n:07d}",
            (date(1930, 1, 1) + timedelta(days=rng.randrange(30_000))).strftime("%Y%m%d"),
            rng.choice("FM"),
        )
        for n in range(patients)
    ]
    rows = [
        StudyRow(
            f"{UID_ROOT}.{n}",
            rng.randrange(patients),
            FIRST_DAY + timedelta(days=rng.randrange(DAYS)),
            f"ACC{n:08d}",
        )
        for n in range(studies)
    ]
    return Dataset_(people, rows)


# -- phivault: bulk rows as ingest writes them --------------------------------------------


def load_phivault(runtime: Runtime, institution: str, data: Dataset_) -> None:
    secret = runtime.ingest.secrets.get(institution)
    keys = runtime.keys
    now = runtime.clock.now()
    refs: list[tuple[str, str]] = []  # (pseudonym, patient key) per patient
    for start in range(0, len(data.patients), BATCH):
        chunk = data.patients[start : start + BATCH]
        patient_rows: list[dict[str, object]] = []
        token_rows: list[dict[str, object]] = []
        with runtime.db.transaction() as session:
            for person in chunk:
                key_id = keys.new_patient_key(session, institution, now)
                pseudonym = new_id()
                refs.append((pseudonym, key_id))
                record = PhiRecord(
                    patient_name=person.name,
                    patient_id=person.patient_id,
                    issuer_of_patient_id=ISSUER,
                    birth_date=person.birth_date,
                    sex=person.sex,
                )
                sealed = {
                    column: keys.encrypt_field(
                        session,
                        key_id,
                        getattr(record, column),
                        aad=field_aad("phi_patients", column, pseudonym),
                    )
                    for column in ("patient_id", "issuer_of_patient_id", "patient_name", "birth_date", "sex")
                }
                patient_rows.append(
                    {
                        "id": pseudonym,
                        "institution_id": institution,
                        "patient_key_id": key_id,
                        "patient_id_index": patient_index(secret, record, ""),
                        "created_at": now,
                        "updated_at": now,
                        **sealed,
                    }
                )
                token_rows.extend(
                    {"institution_id": institution, "token": token, "patient_id": pseudonym}
                    for token in patient_tokens(
                        secret, patient_name=person.name, patient_id=person.patient_id
                    )
                )
        with runtime.phi_db.transaction() as phi:
            phi.execute(insert(PhiPatient), patient_rows)
            phi.execute(insert(PhiPatientToken), token_rows)
        print(f"  patients {start + len(chunk)}/{len(data.patients)}", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    for start in range(0, len(data.studies), BATCH):
        study_chunk = data.studies[start : start + BATCH]
        studies: list[dict[str, object]] = []
        series: list[dict[str, object]] = []
        instances: list[dict[str, object]] = []
        phi_studies: list[dict[str, object]] = []
        with runtime.db.transaction() as session:
            for offset, row in enumerate(study_chunk):
                pseudonym, key_id = refs[row.patient]
                study_id, series_id = new_id(), new_id()
                created = now - timedelta(seconds=len(data.studies) - start - offset)
                studies.append(
                    {
                        "id": study_id,
                        "institution_id": institution,
                        "patient_ref": pseudonym,
                        "patient_key_id": key_id,
                        "study_instance_uid": remap_uid(row.uid, secret.uid),
                        "study_date": "",
                        "study_time": "",
                        "study_description": "",
                        "modalities": "US",
                        "number_of_series": 1,
                        "number_of_instances": 1,
                        "size": 4096,
                        "archived_at": None,
                        "created_at": created,
                        "updated_at": created,
                    }
                )
                series.append(
                    {
                        "id": series_id,
                        "institution_id": institution,
                        "study_id": study_id,
                        "series_instance_uid": remap_uid(row.uid + ".1", secret.uid),
                        "modality": "US",
                        "series_number": 1,
                        "series_description": "",
                        "number_of_instances": 1,
                        "created_at": created,
                    }
                )
                instance_id = new_id()
                instances.append(
                    {
                        "id": instance_id,
                        "institution_id": institution,
                        "study_id": study_id,
                        "series_id": series_id,
                        "sop_instance_uid": remap_uid(row.uid + ".1.1", secret.uid),
                        "sop_class_uid": SecondaryCaptureImageStorage,
                        "transfer_syntax_uid": ExplicitVRLittleEndian,
                        "instance_number": 1,
                        "rows": 8,
                        "columns": 8,
                        "number_of_frames": None,
                        "object_key": f"bench/{instance_id}",
                        "size": 4096,
                        "sha256": "0" * 64,
                        "received_size": 4096,
                        "received_sha256": "0" * 64,
                        "channel": IngestChannel.STOW.value,
                        "device_id": None,
                        "created_at": created,
                    }
                )
                day = row.day.strftime("%Y%m%d")
                document = {
                    "accession_number": row.accession,
                    "referring_physician_name": "",
                    "study_date": day,
                    "study_time": "101500",
                    "study_description": "Abdomen",
                    "study_id": "1",
                    "study_instance_uid": row.uid,
                }
                phi_studies.append(
                    {
                        "id": study_id,
                        "institution_id": institution,
                        "patient_id": pseudonym,
                        "accession_number_index": secret.blind("accession", row.accession),
                        "study_date_index": secret.blind("study-date", day),
                        "record": keys.encrypt_field(
                            session,
                            key_id,
                            json.dumps(document, sort_keys=True, separators=(",", ":")),
                            aad=field_aad("phi_studies", "record", study_id),
                        ),
                        "created_at": created,
                    }
                )
            session.execute(insert(Study), studies)
            session.execute(insert(Series), series)
            session.execute(insert(Instance), instances)
        with runtime.phi_db.transaction() as phi:
            phi.execute(insert(PhiStudy), phi_studies)
        print(f"  studies {start + len(study_chunk)}/{len(data.studies)}", file=sys.stderr, end="\r")
    print(file=sys.stderr)


def cine(patient: PatientRow) -> Dataset:
    ds = _base(patient, f"{UID_ROOT}.999999", "ACCCINE", "20251231")
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.Modality = "US"
    ds.Manufacturer = "Bench Sonics"
    ds.ManufacturerModelName = "B-1"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = CINE_ROWS, CINE_COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = CINE_FRAMES
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = 33.3
    frame = np.random.default_rng(3).integers(0, 255, size=(CINE_ROWS, CINE_COLUMNS, 3), dtype=np.uint8)
    ds.PixelData = np.concatenate([np.roll(frame, i, axis=1) for i in range(CINE_FRAMES)]).tobytes()
    return _finish(ds)


def _base(patient: PatientRow, study_uid: str, accession: str, day: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid + ".1"
    ds.SOPInstanceUID = study_uid + ".1.1"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = ISSUER
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyDate = day
    ds.StudyTime = "101500"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.InstanceNumber = 1
    ds.SeriesNumber = 1
    return ds


def _finish(ds: Dataset) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def orthanc_instance(patient: PatientRow, row: StudyRow) -> bytes:
    """One small Secondary Capture per study for Orthanc: the same attributes QIDO matches."""
    ds = _base(patient, row.uid, row.accession, row.day.strftime("%Y%m%d"))
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "US"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    return to_bytes(_finish(ds))


# -- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latencies:
    target: str
    query: str
    samples: list[float]  # milliseconds
    failures: int

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        return statistics.quantiles(self.samples, n=20)[18] if len(self.samples) > 1 else self.samples[0]


def measure(
    target: str, name: str, client: httpx.Client, requests: Iterator[tuple[str, dict[str, str]]], count: int
) -> Latencies:
    samples, failures = [], 0
    for index, (url, headers) in enumerate(requests):
        if index >= count + 10:
            break
        started = time.perf_counter()
        response = client.get(url, headers=headers)
        response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            failures += 1
            if failures <= 3:
                print(f"  {target} {name}: {response.status_code} {response.text[:200]}", file=sys.stderr)
        if index >= 10:  # the first ten warm caches and connections
            samples.append(elapsed)
    return Latencies(target, name, samples, failures)


def query_streams(
    data: Dataset_, limit: int, seed: int, prefix: str
) -> dict[str, Callable[[], Iterator[tuple[str, dict[str, str]]]]]:
    json_accept = {"Accept": "application/dicom+json"}

    def patient_ids() -> Iterator[tuple[str, dict[str, str]]]:
        rng = _seeded(seed)
        while True:
            patient = data.patients[data.studies[rng.randrange(len(data.studies))].patient]
            yield f"{prefix}/studies?PatientID={patient.patient_id}&limit={limit}", json_accept

    def names() -> Iterator[tuple[str, dict[str, str]]]:
        rng = _seeded(seed + 1)
        while True:
            family = data.patients[rng.randrange(len(data.patients))].name.split("^")[0]
            yield f"{prefix}/studies?PatientName={family[:5]}*&limit={limit}", json_accept

    def dates() -> Iterator[tuple[str, dict[str, str]]]:
        rng = _seeded(seed + 2)
        while True:
            start = FIRST_DAY + timedelta(days=rng.randrange(DAYS - 7))
            span = f"{start:%Y%m%d}-{start + timedelta(days=6):%Y%m%d}"
            yield f"{prefix}/studies?StudyDate={span}&limit={limit}", json_accept

    return {"PatientID": patient_ids, "PatientName wildcard": names, "StudyDate 7-day range": dates}


def run_queries(
    target: str,
    client: httpx.Client,
    data: Dataset_,
    args: argparse.Namespace,
    prefix: str,
    frame_url: str,
) -> list[Latencies]:
    LOAD.append(os.getloadavg()[0])
    results = []
    for name, stream in query_streams(data, args.limit, 11, prefix).items():
        print(f"  {target}: {name} …", file=sys.stderr)
        results.append(measure(target, name, client, stream(), args.queries))
    frame_headers = {"Accept": 'multipart/related; type="application/octet-stream"'}

    def frames() -> Iterator[tuple[str, dict[str, str]]]:
        while True:
            yield frame_url, frame_headers

    print(f"  {target}: WADO frame 60 …", file=sys.stderr)
    results.append(measure(target, "WADO-RS frame 60 of 120", client, frames(), args.queries))
    return results


# -- the two servers -----------------------------------------------------------------------


def _cli(env: dict[str, str], *args: str, stdin: str = "") -> dict[str, str]:
    done = subprocess.run(  # our own CLI, fixed arguments
        [PHIVAULT, *args, "--json"], env=env, input=stdin, capture_output=True, text=True, check=True
    )
    result: dict[str, str] = json.loads(done.stdout)
    return result


def run_phivault(data: Dataset_, args: argparse.Namespace, tmp: Path) -> list[Latencies]:
    postgres = PostgresServer()
    postgres.start()
    try:
        suffix = new_id().replace("-", "")[:8]
        main_url = postgres.create_database(f"main_{suffix}")
        phi_url = postgres.create_database(f"phi_{suffix}")
        data_dir = tmp / "data"
        settings = load_settings(data_dir=data_dir, database_url=main_url, phi_database_url=phi_url)
        runtime = build_runtime(settings)
        initialise(runtime)
        env = {name: value for name, value in os.environ.items() if not name.startswith("PHIVAULT_")}
        env |= {
            "PHIVAULT_DATA_DIR": str(data_dir),
            "PHIVAULT_DATABASE_URL": main_url,
            "PHIVAULT_PHI_DATABASE_URL": phi_url,
            "PHIVAULT_ACCESS_TOKEN_SECONDS": "900",
        }
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
        started = time.perf_counter()
        load_phivault(runtime, institution, data)
        origin = IngestOrigin(institution, SystemSubject(Actor.system("bench")), IngestChannel.STOW)
        receipt = runtime.ingest.ingest(to_bytes(cine(data.patients[0])), origin)
        print(f"  phivault loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        runtime.close()
        port = free_port()
        env["PHIVAULT_PUBLIC_URL"] = f"https://127.0.0.1:{port}"
        server = PhivaultServer(data_dir, port=port, env=env)
        server.start()
        try:
            context = ssl.create_default_context(cafile=server.ca_file)
            with httpx.Client(base_url=server.base_url, verify=context, timeout=120) as client:
                login = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
                client.headers["Authorization"] = f"Bearer {login.raise_for_status().json()['access_token']}"
                frame_url = (
                    f"/dicomweb/studies/{receipt.study_instance_uid}/series/{receipt.series_instance_uid}"
                    f"/instances/{receipt.sop_instance_uid}/frames/60"
                )
                return run_queries("phivault", client, data, args, "/dicomweb", frame_url)
        finally:
            server.terminate()
    finally:
        postgres.remove()


def free_port() -> int:
    from servers.common import free_port as pick  # noqa: PLC0415  # tests/ is on the path now

    return pick()


def run_orthanc(data: Dataset_, args: argparse.Namespace) -> list[Latencies]:
    with OrthancServer() as orthanc:
        started = time.perf_counter()
        queue = list(range(len(data.studies)))
        lock = threading.Lock()
        failures: list[str] = []

        def worker() -> None:
            with orthanc.rest() as rest:
                while True:
                    with lock:
                        if not queue:
                            return
                        index = queue.pop()
                    row = data.studies[index]
                    answer = rest.post(
                        "/instances", content=orthanc_instance(data.patients[row.patient], row)
                    )
                    if answer.status_code != 200:
                        with lock:
                            failures.append(str(answer.status_code))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with orthanc.rest() as rest:
            rest.post("/instances", content=to_bytes(cine(data.patients[0]))).raise_for_status()
        print(
            f"  orthanc loaded in {time.perf_counter() - started:.0f} s ({len(failures)} failures)",
            file=sys.stderr,
        )
        with httpx.Client(base_url=orthanc.url, auth=orthanc.auth, timeout=120) as client:
            uid = f"{UID_ROOT}.999999"
            frame_url = f"/dicom-web/studies/{uid}/series/{uid}.1/instances/{uid}.1.1/frames/60"
            return run_queries("orthanc", client, data, args, "/dicom-web", frame_url)


def report(results: list[Latencies], args: argparse.Namespace) -> tuple[str, bool]:
    lines = [
        "## Queries and frames (bench/query.py)",
        "",
        (
            f"`.venv/bin/python bench/query.py --studies {args.studies} --patients {args.patients} "
            f"--queries {args.queries} --limit {args.limit}` on {datetime.now(UTC):%Y-%m-%d}, {machine()}."
        ),
        "",
        (
            f"{args.studies} studies of {args.patients} made-up patients on PostgreSQL 15 (throwaway "
            "cluster, fsync off), written in bulk as ingest writes them (sealed PHI, blind indexes, name "
            "tokens, index rows; no instance PHI documents or objects), plus one 120-frame 640x480 RGB "
            "cine through the real ingest pipeline. phivault `serve` over TLS as a clinician: PHI keys "
            "matched by blind index, PHI decrypted for the answers, every search audited. "
            "Orthanc 1.10 (Debian) with its "
            "DICOMweb plugin, default SQLite index, the same patients, dates, accession numbers and "
            "UIDs, over plain HTTP. One client, sequential requests after ten warm-up requests, "
            f"QIDO-RS `limit={args.limit}`; client and servers on the same machine (2 cores shared "
            f"with other work; 1-minute load average {LOAD[0]:.1f} when phivault's queries began, "
            f"{LOAD[-1]:.1f} at the end)."
        ),
        "",
        "| query | server | p50 ms | p95 ms | failures |",
        "|---|---|---|---|---|",
    ]
    met = True
    by_query: dict[str, dict[str, Latencies]] = {}
    for result in results:
        by_query.setdefault(result.query, {})[result.target] = result
    for query, pair in by_query.items():
        for target in ("orthanc", "phivault"):
            if target in pair:
                run = pair[target]
                lines.append(f"| {query} | {target} | {run.p50:.1f} | {run.p95:.1f} | {run.failures} |")
        ours = pair.get("phivault")
        theirs = pair.get("orthanc")
        if ours is not None:
            met = met and ours.p95 < TARGET_MS and not ours.failures
            if theirs is not None:
                met = met and ours.p95 <= theirs.p95
    lines += [
        "",
        f"Target: phivault p95 <= Orthanc's and < {TARGET_MS:.0f} ms for every row: "
        + ("met." if met else "NOT met."),
    ]
    if args.skip_orthanc:
        lines.append("Orthanc was not run (`--skip-orthanc`): the comparison is missing.")
    return "\n".join(lines), met


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--patients", type=int, default=40_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--limit", type=int, default=25)
    parser.add_argument("--skip-orthanc", action="store_true")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    data = generate(args.studies, args.patients)
    results: list[Latencies] = []
    with tempfile.TemporaryDirectory(prefix="phivault-bench-query-") as tmp:
        print("phivault …", file=sys.stderr)
        results += run_phivault(data, args, Path(tmp))
        if not args.skip_orthanc:
            print("orthanc …", file=sys.stderr)
            try:
                results += run_orthanc(data, args)
            except OrthancUnavailable as exc:
                print(f"  orthanc unavailable: {exc}", file=sys.stderr)
                args.skip_orthanc = True
    LOAD.append(os.getloadavg()[0])
    text, met = report(results, args)
    print(text)
    if args.write_docs:
        write_section("query.py", text)
    return 0 if met else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
