"""Ingest of a large instance runs in memory independent of its Pixel Data, and stores the
same de-identified file the in-memory path (pydicom holding every value) writes.
"""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom import uid as dicom_uid
from pydicom.filewriter import dcmwrite

from factories.accounts import AccountsFactory
from factories.dicom_factory import make_instance, to_bytes
from phivault.audit.service import Actor, SystemSubject
from phivault.crypto.service import ObjectContext
from phivault.dicom import apply_pixel_rules, deidentify, validate
from phivault.exams.ingest import INSTANCE_KIND
from phivault.exams.models import Instance, Study
from phivault.exams.types import IngestChannel, IngestOrigin, ReceiptStatus
from phivault.runtime import Runtime

# 640 x 480 RGB, 220 frames: 203 MB of Pixel Data, an ultrasound cine of ~9 s.
_ROWS, _COLUMNS, _FRAMES = 480, 640, 220
_PIXEL_BYTES = _ROWS * _COLUMNS * 3 * _FRAMES
# What ingest may allocate besides Pixel Data: frames in flight, the encryptor's segments,
# the object store's buffers, pydicom's header. Far below one tenth of the value.
_PEAK_LIMIT = 24 * 1024 * 1024


def _origin(institution_id: str) -> IngestOrigin:
    return IngestOrigin(
        institution_id,
        SystemSubject(Actor.system("test-sender"), institution_id),
        IngestChannel.UPLOAD,
        device_id=None,
    )


def _write_cine(path: Path) -> None:
    """A synthetic ultrasound cine (made-up patient), written without holding it twice."""
    dataset, _ = make_instance(
        sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, rows=_ROWS, columns=_COLUMNS, frames=1
    )
    dataset.NumberOfFrames = _FRAMES
    frame = np.arange(_ROWS * _COLUMNS * 3, dtype=np.uint32) % 251 + 1
    dataset.PixelData = np.tile(frame.astype(np.uint8), _FRAMES).tobytes()
    with path.open("wb") as file:
        dcmwrite(file, dataset, enforce_file_format=True)


def _stored_plaintext_sha256(runtime: Runtime, instance_id: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with runtime.db.transaction() as session:
        row = session.get(Instance, instance_id)
        assert row is not None
        study = session.get(Study, row.study_id)
        assert study is not None
        opened = runtime.keys.open_object(
            runtime.store,
            row.object_key,
            session=session,
            context=ObjectContext(row.institution_id, study.patient_key_id, INSTANCE_KIND),
        )
        for piece in opened.iter_plaintext():
            digest.update(piece)
            size += len(piece)
    return digest.hexdigest(), size


class _HashingSink:
    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def seek(self, *_: int) -> int:  # pydicom's DicomIO wants one; it never seeks to write
        raise io.UnsupportedOperation

    def flush(self) -> None:
        pass


def _in_memory_sha256(runtime: Runtime, institution_id: str, path: Path, pseudonym: str) -> tuple[str, int]:
    """What the pipeline stored before it streamed: every value in memory, pydicom writes."""
    dataset = validate(path.read_bytes(), max_size=2**31).dataset
    with runtime.db.read() as session:
        policy = runtime.ingest.policies.load(session, institution_id)
    secret = runtime.ingest.secrets.get(institution_id)
    deidentified = deidentify(
        dataset, options=policy.options, institution_secret=secret.uid, pseudonym=pseudonym
    )
    del dataset
    apply_pixel_rules(deidentified, policy.rules)
    sink = _HashingSink()
    dcmwrite(sink, deidentified, enforce_file_format=True)  # type: ignore[arg-type]  # write/tell suffice
    return sink.digest.hexdigest(), sink.size


# The database only sees the index rows, the same for any size: SQLite is enough here.
@pytest.mark.parametrize("db_backend", ["sqlite"])
def test_a_large_cine_is_ingested_in_memory_far_below_its_pixel_data_and_stored_as_before(
    runtime: Runtime, tmp_path: Path
) -> None:
    institution = AccountsFactory(runtime).institution().id
    path = tmp_path / "cine.dcm"
    _write_cine(path)
    with path.open("rb") as source:
        tracemalloc.start()
        try:
            receipt = runtime.ingest.ingest(source, _origin(institution))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert receipt.status is ReceiptStatus.STORED
    assert receipt.size == path.stat().st_size > _PIXEL_BYTES
    assert peak < _PEAK_LIMIT, f"ingest peaked at {peak / 2**20:.1f} MiB for {_PIXEL_BYTES / 2**20:.0f} MiB"

    stored_sha256, stored_size = _stored_plaintext_sha256(runtime, receipt.instance_id)
    with runtime.db.read() as session:
        row = session.get(Instance, receipt.instance_id)
        assert row is not None
        assert (row.sha256, row.size) == (stored_sha256, stored_size)
        assert row.number_of_frames == _FRAMES
    with runtime.db.read() as session:
        study = session.get(Study, receipt.study_id)
        assert study is not None
        pseudonym = study.patient_ref
    assert _in_memory_sha256(runtime, institution, path, pseudonym) == (stored_sha256, stored_size)


def test_a_streamed_instance_reads_back_with_the_banner_blanked(runtime: Runtime) -> None:
    institution = AccountsFactory(runtime).institution().id
    dataset, _ = make_instance(
        sop_class=dicom_uid.UltrasoundMultiFrameImageStorage, frames=4, rows=120, columns=64
    )
    receipt = runtime.ingest.ingest(io.BytesIO(to_bytes(dataset)), _origin(institution))
    assert receipt.status is ReceiptStatus.STORED
    with runtime.db.transaction() as session:
        row = session.get(Instance, receipt.instance_id)
        assert row is not None
        study = session.get(Study, row.study_id)
        assert study is not None
        opened = runtime.keys.open_object(
            runtime.store,
            row.object_key,
            session=session,
            context=ObjectContext(institution, study.patient_key_id, INSTANCE_KIND),
        )
        stored = dcmread(io.BytesIO(b"".join(opened.iter_plaintext())))
    pixels = stored.pixel_array
    banner = runtime.settings.dicom_us_banner_rows
    assert not pixels[:, :banner].any()
    assert pixels[:, banner:].all()
    assert stored.BurnedInAnnotation == "NO"


def test_a_large_deflated_instance_is_stored_deflated_with_its_banner_blanked(runtime: Runtime) -> None:
    """Deflated Explicit VR Little Endian (PS3.5 A.5) is kept as received; its Pixel Data,
    above the reader's defer size, is inflated in memory (not streamed) and blanked.
    """
    institution = AccountsFactory(runtime).institution().id
    dataset, _ = make_instance(rows=480, columns=640)
    dataset.file_meta.TransferSyntaxUID = dicom_uid.DeflatedExplicitVRLittleEndian
    raw = to_bytes(dataset)
    receipt = runtime.ingest.ingest(io.BytesIO(raw), _origin(institution))
    assert receipt.status is ReceiptStatus.STORED
    assert receipt.size == len(raw)
    with runtime.db.transaction() as session:
        row = session.get(Instance, receipt.instance_id)
        assert row is not None
        study = session.get(Study, row.study_id)
        assert study is not None
        opened = runtime.keys.open_object(
            runtime.store,
            row.object_key,
            session=session,
            context=ObjectContext(institution, study.patient_key_id, INSTANCE_KIND),
        )
        stored = dcmread(io.BytesIO(b"".join(opened.iter_plaintext())))
    assert stored.file_meta.TransferSyntaxUID == dicom_uid.DeflatedExplicitVRLittleEndian
    pixels = stored.pixel_array
    banner = runtime.settings.dicom_us_banner_rows
    assert not pixels[:banner].any()
    assert (pixels[banner:] == dataset.pixel_array[banner:]).all()
