"""Kill -9 during a 500-instance STOW-RS ingest (issue 6, tests that must exist): after the
sweeper and a restart, every acknowledged instance is there and bit-identical to what its
receipt promised, nothing half-ingested is visible, and no PHI row is left without its exam.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import threading

import httpx
from pydicom import uid as dicom_uid
from sqlalchemy import func, select

from factories.accounts import AccountsFactory
from factories.dicom_factory import make_instance, to_bytes
from phivault.accounts.permissions import Role
from phivault.audit.verify import verify_log
from phivault.config.settings import Settings
from phivault.crypto.service import ObjectContext
from phivault.exams.ingest import INSTANCE_KIND
from phivault.exams.models import Instance, Series, Study
from phivault.exams.phi_models import PhiInstance, PhiPatient, PhiStudy
from phivault.runtime import Runtime, build_runtime, initialise
from servers.phivault import PHIVAULT, PhivaultServer, phivault_env

INSTANCES = 500
CLIENTS = 4
KILL_AFTER = 120  # acknowledged instances before the kill
BOUNDARY = "crash-test-boundary"


def _instances() -> list[bytes]:
    """500 small instances: 50 patients, one study and series each, 10 instances per series."""
    out = []
    for n in range(INSTANCES):
        patient, number = divmod(n, 10)
        root = f"1.2.826.0.1.3680043.10.1444.9.{patient + 1}"
        ds, _ = make_instance(
            study_uid=root,
            series_uid=f"{root}.1",
            sop_uid=f"{root}.1.{number + 1}",
            sop_class=dicom_uid.UltrasoundImageStorage,
            rows=32,
            columns=32,
        )
        ds.PatientID = f"MRN-CRASH-{patient:04d}"
        out.append(to_bytes(ds))
    return out


def _body(data: bytes) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def _send_all(
    server: PhivaultServer, token: str, payloads: list[bytes], *, stop_after: int | None
) -> set[str]:
    """Post every payload (``CLIENTS`` threads); return the SHA-256 of each acknowledged one.

    With ``stop_after``, the server is killed with SIGKILL once that many were acknowledged.
    """
    acknowledged: set[str] = set()
    lock = threading.Lock()
    queue = list(payloads)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
    }

    def client() -> None:
        with server.client() as http:
            while True:
                with lock:
                    if not queue:
                        return
                    data = queue.pop()
                try:
                    answer = http.post("/dicomweb/studies", content=_body(data), headers=headers)
                except httpx.TransportError:
                    return  # the server is gone
                if answer.status_code == 200:
                    with lock:
                        acknowledged.add(hashlib.sha256(data).hexdigest())
                        if stop_after is not None and len(acknowledged) == stop_after:
                            assert server.process is not None
                            server.process.send_signal(signal.SIGKILL)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return acknowledged


def _check_consistent(runtime: Runtime, acknowledged: set[str]) -> int:
    """Every visible instance is whole; every acknowledged one is visible. Returns the count."""
    with runtime.db.transaction() as session, runtime.phi_db.transaction() as phi:
        rows = session.execute(
            select(Instance, Study.patient_key_id).join(Study, Study.id == Instance.study_id)
        ).all()
        received = {instance.received_sha256 for instance, _ in rows}
        assert acknowledged <= received, f"{len(acknowledged - received)} acknowledged instances are missing"
        for instance, patient_key_id in rows:
            opened = runtime.keys.open_object(
                runtime.store,
                instance.object_key,
                session=session,
                context=ObjectContext(instance.institution_id, patient_key_id, INSTANCE_KIND),
            )
            plaintext = b"".join(opened.iter_plaintext())
            assert hashlib.sha256(plaintext).hexdigest() == instance.sha256
            assert phi.get(PhiInstance, instance.id) is not None, "an instance without its PHI row"
        for study in session.scalars(select(Study)):
            count = session.scalar(
                select(func.count()).select_from(Instance).where(Instance.study_id == study.id)
            )
            series = session.scalar(
                select(func.count()).select_from(Series).where(Series.study_id == study.id)
            )
            assert (study.number_of_instances, study.number_of_series) == (count, series)
        instance_ids = set(session.scalars(select(Instance.id)))
        study_ids = set(session.scalars(select(Study.id)))
        patient_refs = set(session.scalars(select(Study.patient_ref)))
        assert set(phi.scalars(select(PhiInstance.id))) <= instance_ids, "orphan PHI instance rows"
        assert set(phi.scalars(select(PhiStudy.id))) <= study_ids, "orphan PHI study rows"
        assert set(phi.scalars(select(PhiPatient.id))) <= patient_refs, "orphan PHI patients"
        referenced = set(session.scalars(select(Instance.object_key)))
    assert set(runtime.store.keys("instance/")) == referenced, "objects without their instance"
    return len(rows)


def test_kill_9_during_ingest_loses_nothing_acknowledged_and_leaves_nothing_half_done(
    settings: Settings,
) -> None:
    payloads = _instances()
    env = phivault_env(
        settings.data_dir,
        database_url=settings.database_url,
        phi_database_url=settings.phi_database_url,
        run_worker="false",
    )
    runtime = build_runtime(settings)
    initialise(runtime)
    accounts = AccountsFactory(runtime)
    institution = accounts.institution().id
    clinician = accounts.member(Role.CLINICIAN, institution)
    token, _ = accounts.session_for(clinician)
    runtime.close()

    server = PhivaultServer(settings.data_dir, env=env)
    server.start()
    acknowledged = _send_all(server, token, payloads, stop_after=KILL_AFTER)
    assert server.process is not None
    server.process.wait(60)
    assert server.process.returncode == -signal.SIGKILL, "the server was killed mid-ingest"
    assert KILL_AFTER <= len(acknowledged) < INSTANCES

    # What an operator does after a crash, every server stopped: sweep at once.
    swept = subprocess.run(
        [PHIVAULT, "ingest", "sweep", "--grace-seconds", "0", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert swept.returncode == 0, swept.stderr
    runtime = build_runtime(settings)
    try:
        visible = _check_consistent(runtime, acknowledged)
        assert visible >= len(acknowledged)
    finally:
        runtime.close()

    # Restarted, the sender re-sends what was not acknowledged, and some of what was (those
    # must come back as duplicates): each instance ends up stored exactly once.
    missing = [data for data in payloads if hashlib.sha256(data).hexdigest() not in acknowledged]
    again = [data for data in payloads if hashlib.sha256(data).hexdigest() in acknowledged][:50]
    server = PhivaultServer(settings.data_dir, env=env)
    server.start()
    try:
        resent = _send_all(server, token, missing + again, stop_after=None)
    finally:
        assert server.terminate() == 0
    assert len(resent) == len(missing) + len(again)
    resent |= acknowledged
    runtime = build_runtime(settings)
    try:
        assert _check_consistent(runtime, resent) == INSTANCES
        runtime.audit.integrate_pending(runtime.clock.now())
        assert verify_log(runtime.db).ok
    finally:
        runtime.close()
