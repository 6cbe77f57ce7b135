"""Load and invariants shared by the crash tests: STOW-RS senders that record what was
acknowledged, and the check that after a crash (and the sweeper) every acknowledged
instance is whole, nothing is half-visible and no PHI row or object is left without its
instance.
"""

from __future__ import annotations

import hashlib
import signal
import threading

import httpx
from sqlalchemy import func, select

from phivault.crypto.service import ObjectContext
from phivault.exams.ingest import INSTANCE_KIND
from phivault.exams.models import Instance, Series, Study
from phivault.exams.phi_models import PhiInstance, PhiPatient, PhiStudy
from phivault.runtime import Runtime
from servers.phivault import PhivaultServer

CLIENTS = 4
BOUNDARY = "crash-test-boundary"


def stow_body(data: bytes) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def send_all(
    server: PhivaultServer,
    token: str,
    payloads: list[bytes],
    *,
    stop_after: int | None,
    clients: int = CLIENTS,
) -> set[str]:
    """Post every payload (``clients`` threads); return the SHA-256 of each acknowledged one.

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
                    answer = http.post("/dicomweb/studies", content=stow_body(data), headers=headers)
                except httpx.TransportError:
                    return  # the server is gone
                if answer.status_code == 200:
                    with lock:
                        acknowledged.add(hashlib.sha256(data).hexdigest())
                        if stop_after is not None and len(acknowledged) == stop_after:
                            assert server.process is not None
                            server.process.send_signal(signal.SIGKILL)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return acknowledged


def check_consistent(runtime: Runtime, acknowledged: set[str]) -> int:
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
