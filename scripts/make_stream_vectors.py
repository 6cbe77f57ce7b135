"""Regenerate the known-answer vectors of the encrypted object format.

    python scripts/make_stream_vectors.py           # rewrite tests/unit/crypto/vectors/stream_kat.json
    python scripts/make_stream_vectors.py --check   # exit 1 if the committed file differs

Every input (DEK, salt, nonce prefix, plaintext) is fixed below, so each run writes the same
bytes. If ``--check`` fails after a code change, the format changed: that needs a new
``FORMAT_VERSION`` (objects already stored must stay readable), not new vectors.

The salt and nonce prefix are injected through ``_encrypt_under_header``, which production
code never calls: reusing them with one DEK would reuse GCM nonces.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

from phivault.crypto.stream import MIN_SEGMENT_SIZE, ObjectHeader, _encrypt_under_header

VECTORS_FILE = (
    Path(__file__).resolve().parents[1] / "tests" / "unit" / "crypto" / "vectors" / "stream_kat.json"
)

SEGMENT_SIZE = MIN_SEGMENT_SIZE  # the smallest allowed, so multi-segment vectors stay small
DEK = bytes(range(0x20))
SALT = bytes(range(0x40, 0x60))
NONCE_PREFIX = bytes(range(0xA0, 0xA7))
WRAPPED_DEK = bytes(range(0xC0, 0xE8))  # 40 bytes, the size of an RFC 3394 wrap of a 32-byte key

# (name, plaintext length, key ids, associated data)
CASES: list[tuple[str, int, tuple[str, ...], bytes]] = [
    ("empty", 0, ("institution/1/key@v1",), b""),
    ("shorter-than-one-segment", 100, ("institution/1/key@v1",), b""),
    ("exactly-two-segments", 2 * SEGMENT_SIZE, ("institution/1/key@v1",), b""),
    (
        "two-and-a-half-segments",
        2 * SEGMENT_SIZE + SEGMENT_SIZE // 2,
        ("institution/1/key@v2", "patient/42/key@v1"),
        b"",
    ),
    ("with-associated-data", 5000, ("patient/42/key@v1",), b"objects/ab/ab12cd34"),
]


def _plaintext(name: str, length: int) -> bytes:
    return hashlib.shake_256(f"phivault stream KAT {name}".encode()).digest(length)


def build_document() -> str:
    """Return the exact text of the vector file."""
    vectors = []
    for name, length, key_ids, associated_data in CASES:
        header = ObjectHeader(
            segment_size=SEGMENT_SIZE,
            key_ids=key_ids,
            wrapped_dek=WRAPPED_DEK,
            salt=SALT,
            nonce_prefix=NONCE_PREFIX,
        )
        plaintext = _plaintext(name, length)
        sink = io.BytesIO()
        _encrypt_under_header(io.BytesIO(plaintext), sink, header, DEK, associated_data)
        vectors.append(
            {
                "name": name,
                "segment_size": SEGMENT_SIZE,
                "dek": DEK.hex(),
                "salt": SALT.hex(),
                "nonce_prefix": NONCE_PREFIX.hex(),
                "key_ids": list(key_ids),
                "wrapped_dek": WRAPPED_DEK.hex(),
                "associated_data": associated_data.hex(),
                "plaintext": plaintext.hex(),
                "ciphertext": sink.getvalue().hex(),
            }
        )
    document = {
        "description": (
            "Known answers for phivault's encrypted object format, version 1: AES-256-GCM "
            "segments with STREAM nonces (Tink AES-GCM-HKDF streaming layout); see the "
            "docstring of src/phivault/crypto/stream.py. All byte strings are hex."
        ),
        "generator": "scripts/make_stream_vectors.py",
        "vectors": vectors,
    }
    return json.dumps(document, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare with the committed file, write nothing")
    arguments = parser.parse_args(argv)
    document = build_document()
    if arguments.check:
        current = VECTORS_FILE.read_text(encoding="utf-8") if VECTORS_FILE.exists() else ""
        if current != document:
            print(f"{VECTORS_FILE} differs from what the generator writes", file=sys.stderr)
            return 1
        print(f"{VECTORS_FILE} is up to date")
        return 0
    VECTORS_FILE.parent.mkdir(parents=True, exist_ok=True)
    VECTORS_FILE.write_text(document, encoding="utf-8")
    print(f"wrote {len(CASES)} vectors to {VECTORS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
