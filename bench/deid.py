"""Micro-benchmark of the DICOM ingest layer on 640x480 RGB ultrasound.

    .venv/bin/python bench/deid.py [--seconds 3]

For a single-frame image and a 120-frame cine loop (uncompressed, 0.9 MiB per frame) it
prints instances per second, on one core, of:

* ``header``: validate → extract_phi → deidentify → serialise (pixel data kept as is);
* ``blank``: the same plus the default ultrasound pixel rule (top banner zeroed, a new
  PixelData written).
"""

from __future__ import annotations

import argparse
import functools
import io
import platform
import time
from collections.abc import Callable

import numpy as np
import pydicom
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset

from phivault.dicom import (
    DeidOptions,
    PixelOutcomeKind,
    apply_pixel_rules,
    default_rules,
    deidentify,
    extract_phi,
    validate,
)

SECRET = b"benchmark-institution-secret-32b"
MAX_SIZE = 2 * 1024**3


def make_ultrasound(frames: int) -> bytes:
    """A made-up 640x480 RGB ultrasound instance with a typical header."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = (
        dicom_uid.UltrasoundMultiFrameImageStorage if frames > 1 else dicom_uid.UltrasoundImageStorage
    )
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1444.9.1.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1444.9.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1444.9.1.1"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240102", "101500", "ACC123456"
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "US", "Acme Sonics", "Sono 5000"
    ds.InstitutionName, ds.StationName = "Made-up General Hospital", "US-ROOM-2"
    ds.ReferringPhysicianName, ds.OperatorsName = "Doe^Jane", "Roe^Richard"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Test^Bench",
        "BENCH-1",
        "19700101",
        "O",
    )
    ds.StudyDescription, ds.SeriesDescription = "Abdomen", "Liver"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "SN-0001", "1.0"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 480, 640, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.random.default_rng(1).integers(1, 255, frames * 480 * 640 * 3, dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ingest(raw: bytes, *, blank: bool) -> int:
    instance = validate(raw, max_size=MAX_SIZE)
    extract_phi(instance.dataset)
    output = deidentify(
        instance.dataset, options=DeidOptions(), institution_secret=SECRET, pseudonym="pt_bench"
    )
    if blank and apply_pixel_rules(output, default_rules()).kind is not PixelOutcomeKind.BLANKED:
        raise RuntimeError("the default ultrasound rule did not apply")
    buffer = io.BytesIO()
    output.save_as(buffer, enforce_file_format=True)
    return len(buffer.getvalue())


def rate(work: Callable[[], int], seconds: float) -> tuple[float, float]:
    """Instances per second and MiB per second of output over at least ``seconds``."""
    work()  # warm-up
    count, written, start = 0, 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        written += work()
        count += 1
    return count / elapsed, written / elapsed / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(f"python {platform.python_version()}, pydicom {pydicom.__version__}, numpy {np.__version__}")
    print(f"{'instance':<28}{'stage':<8}{'instances/s':>12}{'MiB/s':>10}")
    for frames in (1, 120):
        raw = make_ultrasound(frames)
        name = f"640x480 RGB, {frames} frame{'s' if frames > 1 else ''}"
        for stage, blank in (("header", False), ("blank", True)):
            per_second, mib = rate(functools.partial(ingest, raw, blank=blank), args.seconds)
            print(f"{name:<28}{stage:<8}{per_second:>12.1f}{mib:>10.1f}")


if __name__ == "__main__":
    main()
