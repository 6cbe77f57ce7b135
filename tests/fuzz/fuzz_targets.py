"""Coverage-guided fuzz targets (atheris / libFuzzer) over parsers of untrusted bytes.

Run by tests/security/test_fuzz.py; by hand:

    .venv/bin/python tests/fuzz/fuzz_targets.py object_reader -max_total_time=60 CORPUS_DIR

Each target may raise only the documented error types; anything else (or a hang past
libFuzzer's ``-timeout``) is a crash, saved by libFuzzer as ``crash-<sha1>`` in the working
directory and kept under tests/fuzz/regressions/<target>/ as a regression input.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

import atheris  # type: ignore[import-untyped]  # ships no type information

with atheris.instrument_imports(include=["phivault"]):
    from phivault.crypto.errors import CryptoError
    from phivault.crypto.stream import (
        ObjectReader,
        SeekableFileSource,
        encrypt_stream,
        read_header_from_range,
    )
    from phivault.dicom import (
        DeidOptions,
        DicomRejected,
        apply_pixel_rules,
        default_rules,
        deidentify,
        extract_phi,
        validate,
    )

DEK = bytes(range(32))  # a fuzzing key: every input is synthetic


def object_reader(data: bytes) -> None:
    """Untrusted ciphertext: header parsing and range reads fail only with CryptoError."""
    provider = atheris.FuzzedDataProvider(data)
    offset = provider.ConsumeIntInRange(0, 1 << 20)
    length = provider.ConsumeIntInRange(0, 1 << 20)
    ciphertext = provider.ConsumeBytes(provider.remaining_bytes())
    source = SeekableFileSource(io.BytesIO(ciphertext))
    try:
        header = read_header_from_range(source)
        ObjectReader(source, DEK, header=header).read(offset, length)
    except CryptoError:
        pass


MAX_INSTANCE = 8 * 1024 * 1024
SECRET = b"fuzzing-institution-secret"
ALL_OPTIONS = DeidOptions(
    retain_modified_dates=True,
    retain_device_identity=True,
    retain_patient_characteristics=True,
    clean_descriptors=True,
)


def dicom_ingest(data: bytes) -> None:
    """Untrusted DICOM through the ingest steps.

    Only ``DicomRejected`` may come out of validation, and a validated instance must
    extract, de-identify and pass the pixel rules without any error.
    """
    try:
        instance = validate(data, max_size=MAX_INSTANCE)
    except DicomRejected:
        return
    extract_phi(instance.dataset)
    for options in (DeidOptions(), ALL_OPTIONS):
        clean = deidentify(instance.dataset, options=options, institution_secret=SECRET, pseudonym="P-0001")
        apply_pixel_rules(clean, default_rules())


TARGETS: dict[str, Callable[[bytes], None]] = {"object_reader": object_reader, "dicom_ingest": dicom_ingest}


def seed_corpus(target: str, directory: Path) -> None:
    """Valid inputs to start from: encrypted objects of a few sizes and segment sizes."""
    directory.mkdir(parents=True, exist_ok=True)
    if target == "object_reader":
        for size, segment in ((0, 4096), (1, 4096), (4096, 4096), (10_000, 4096), (70_000, 65536)):
            sink = io.BytesIO()
            encrypt_stream(
                io.BytesIO(bytes(size)),
                sink,
                dek=DEK,
                key_ids=["k1"],
                wrapped_dek=b"w" * 40,
                segment_size=segment,
            )
            # The provider reads two 3-byte integers first, then the ciphertext.
            (directory / f"seed-{size}-{segment}").write_bytes(b"\x00" * 8 + sink.getvalue())
    elif target == "dicom_ingest":
        _dicom_seeds(directory)


def _dicom_seeds(directory: Path) -> None:
    from pydicom.data import get_testdata_file  # noqa: PLC0415  # only for seeding

    bundled = (
        "CT_small.dcm",
        "MR_small.dcm",
        "examples_ybr_color.dcm",
        "examples_rgb_color.dcm",
        "SC_rgb_rle.dcm",
    )
    for name in bundled:
        path = get_testdata_file(name, read=False, download=False)
        if path is not None:
            data = Path(str(path)).read_bytes()
            # A cine loop is large: its first 256 KiB keep the header and some pixel data.
            (directory / f"seed-{name}").write_bytes(data[: 256 * 1024])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from factories.dicom_factory import make_instance, to_bytes  # noqa: PLC0415  # synthetic exams

    for frames in (1, 3):
        dataset, _planted = make_instance(frames=frames)
        (directory / f"seed-synthetic-{frames}").write_bytes(to_bytes(dataset))


def main() -> None:
    target = sys.argv[1]
    if sys.argv[2:3] == ["--seed"]:
        seed_corpus(target, Path(sys.argv[3]))
        return
    atheris.Setup([sys.argv[0], *sys.argv[2:]], TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
