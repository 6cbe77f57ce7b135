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


TARGETS: dict[str, Callable[[bytes], None]] = {"object_reader": object_reader}


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


def main() -> None:
    target = sys.argv[1]
    if sys.argv[2:3] == ["--seed"]:
        seed_corpus(target, Path(sys.argv[3]))
        return
    atheris.Setup([sys.argv[0], *sys.argv[2:]], TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
