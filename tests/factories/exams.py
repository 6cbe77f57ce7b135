"""Exams for tests: ingested synthetic studies and the principals that read them."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, itemize_frame

from factories.accounts import AccountsFactory, Member
from factories.dicom_factory import make_instance, pixel_pattern, to_bytes
from phivault.accounts.permissions import Role
from phivault.accounts.principal import Principal
from phivault.audit.service import Actor, SystemSubject
from phivault.dicom.pixels import DEFAULT_BANNER_ROWS
from phivault.exams.reading import ExamReader
from phivault.exams.types import IngestChannel, IngestOrigin, Receipt, ReceiptStatus
from phivault.runtime import Runtime

STUDY_UID = "1.2.826.0.1.3680043.10.1444.1.1"
BANNER_ROWS = DEFAULT_BANNER_ROWS  # ultrasound: the default pixel rule blanks the top rows


def stored_pixels(rows: int, columns: int, frames: int, *, rgb: bool) -> np.ndarray:
    """The pixel data of ``make_instance`` as stored: the ultrasound banner blanked."""
    pixels = pixel_pattern(rows, columns, frames, rgb=rgb).copy()
    pixels[:, :BANNER_ROWS] = 0
    return pixels


def multipart_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Type, bytes) of each part of a multipart/related body."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    assert match is not None, content_type
    delimiter = b"--" + match[1].encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, payload = chunk.partition(b"\r\n\r\n")
        kind = next(
            (
                line.split(b":", 1)[1].strip().decode()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-type:")
            ),
            "",
        )
        parts.append((kind, payload.removesuffix(b"\r\n")))
    return parts


def jpeg_instance(  # every knob a test turns is a keyword
    *,
    study_uid: str = "1.2.826.0.1.3680043.10.1444.7",
    frames: int = 3,
    rows: int = 32,
    columns: int = 40,
    basic_offset_table: bool = True,
    fragments_per_frame: int = 1,
) -> tuple[Dataset, list[bytes]]:
    """A Secondary Capture of JPEG Baseline grayscale frames (no burned-in text, so ingest
    keeps it as it is) and each frame's JPEG bytes; frame *n* is uniformly ``40 n - 20``.
    """
    dataset, _ = make_instance(
        study_uid=study_uid,
        series_uid=study_uid + ".1",
        sop_uid=study_uid + ".1.1",
        sop_class=dicom_uid.SecondaryCaptureImageStorage,
        modality="OT",
        burned_in="NO",
        rows=rows,
        columns=columns,
        frames=frames,
        rgb=False,
    )
    encoded = []
    for number in range(frames):
        image = Image.fromarray(np.full((rows, columns), 40 * number + 20, dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        encoded.append(buffer.getvalue())
    if fragments_per_frame == 1:
        dataset.PixelData = encapsulate(encoded, has_bot=basic_offset_table)
    else:
        items = b"".join(
            b"".join(itemize_frame(frame, nr_fragments=fragments_per_frame)) for frame in encoded
        )
        dataset.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + items  # an empty Basic Offset Table
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.file_meta.TransferSyntaxUID = dicom_uid.JPEGBaseline8Bit
    dataset.LossyImageCompression = "01"
    dataset.WindowCenter, dataset.WindowWidth = 128, 256  # rendered values then equal stored ones
    return dataset, encoded


def reader_of(runtime: Runtime) -> ExamReader:
    return ExamReader(
        runtime.db,
        runtime.phi_db,
        runtime.store,
        runtime.keys,
        runtime.ingest.secrets,
        runtime.ingest.phi,
        runtime.clock,
    )


def principal(member: Member) -> Principal:
    return Principal.for_user(member.user_id, member.institution_id, member.role, None)


@dataclass
class IngestedStudy:
    """One study ingested for an institution: what was sent, what was planted, the receipts."""

    institution_id: str
    originals: list[Dataset]
    planted: list[str]
    receipts: list[Receipt] = field(default_factory=list)

    @property
    def study_id(self) -> str:
        study_id = self.receipts[0].study_id
        assert study_id is not None
        return study_id

    @property
    def study_uid(self) -> str:
        return self.receipts[0].study_instance_uid


class ExamsFactory:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.accounts = AccountsFactory(runtime)

    def study(  # noqa: PLR0913  # every knob a test turns is a keyword
        self,
        institution_id: str,
        *,
        study_uid: str = STUDY_UID,
        instances: int = 2,
        frames: int = 1,
        rgb: bool = True,
        rows: int = 48,
        columns: int = 64,
        modality: str = "US",
        patch: dict[str, str] | None = None,
        plant_phi: bool = True,
    ) -> IngestedStudy:
        """Ingest ``instances`` synthetic instances of one study (one series) for an institution.

        ``patch`` sets attributes by keyword on every instance (e.g. another PatientName).
        """
        originals: list[Dataset] = []
        planted: set[str] = set()
        receipts = []
        for number in range(1, instances + 1):
            dataset, values = make_instance(
                study_uid=study_uid,
                series_uid=f"{study_uid}.1",
                sop_uid=f"{study_uid}.1.{number}",
                frames=frames,
                rgb=rgb,
                rows=rows,
                columns=columns,
                modality=modality,
                # not ultrasound: a screen capture without burned-in text (no pixel rule needed)
                sop_class=dicom_uid.UltrasoundImageStorage
                if modality == "US"
                else dicom_uid.SecondaryCaptureImageStorage,
                burned_in=None if modality == "US" else "NO",
                plant_phi=plant_phi,
            )
            dataset.InstanceNumber = number
            for keyword, value in (patch or {}).items():
                setattr(dataset, keyword, value)
            planted.update(values.values)
            planted.update(v for v in (patch or {}).values() if len(v) > 5)
            receipt = self.runtime.ingest.ingest(to_bytes(dataset), self.origin(institution_id))
            assert receipt.status is ReceiptStatus.STORED, receipt
            originals.append(dataset)
            receipts.append(receipt)
        return IngestedStudy(institution_id, originals, sorted(planted), receipts)

    def origin(self, institution_id: str) -> IngestOrigin:
        return IngestOrigin(
            institution_id, SystemSubject(Actor.system("test-sender"), institution_id), IngestChannel.STOW
        )

    def reader(self, role: Role, institution_id: str | None) -> tuple[Member, Principal]:
        member = self.accounts.member(role, institution_id, mfa=True)
        return member, principal(member)
