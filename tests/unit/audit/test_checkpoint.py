"""Signed checkpoints: the c2sp.org signed-note and tlog-checkpoint formats, known answers included."""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from phivault.audit.checkpoint import (
    MAX_NOTE_BYTES,
    MAX_SIGNATURES,
    Checkpoint,
    NoteVerifier,
    key_id,
    open_note,
    parse_and_verify,
    parse_signer_key,
    parse_verifier_key,
    sign_checkpoint,
    sign_note,
    signer_key,
    verifier_key,
)
from phivault.audit.errors import CheckpointError

if TYPE_CHECKING:
    from collections.abc import Callable

ORIGIN = "audit.phivault.example/hospital-7"
LOG_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"phivault test log key").digest())
WITNESS_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"test witness key").digest())
ROOT = hashlib.sha256(b"some root").digest()
CHECKPOINT = Checkpoint(ORIGIN, 1_000_003, ROOT)
LOG_VERIFIER = verifier_key(ORIGIN, LOG_KEY.public_key())

# Known answers from golang.org/x/mod/sumdb/note (note.go package documentation and
# note_test.go): Peter Neumann's example key pair and the note it signs.
PETER_SIGNER = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VERIFIER = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VERIFIER = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
NEUMANN_TEXT = (
    "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
)
PETER_SIGNATURE = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvq"
    "fqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIGNATURE = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTG"
    "wnWLox33WWd1RvMc+QQ=\n"
)

# Known answers in the checkpoint format: signed tree heads of the Go checksum database,
# verified with its published key (cmd/go/internal/modfetch/key.go). The first was retrieved
# from https://sum.golang.org/latest on 2024-09-23 (sigsum-go pkg/checkpoint tests); the second
# appears in trillian-tessera's internal/parse tests (final newline of its signature restored).
GO_SUMDB_VERIFIER = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
GO_SUMDB_CHECKPOINTS = [
    (
        (
            "go.sum database tree\n30055305\nmXfgRcJ0bG0j3CPdKwgGWtUzBUbX67saZGRmFuJGGsM=\n\n"
            "\u2014 sum.golang.org Az3grpgEild5qw7+5dtV13Kf1C2Xurm8q4fhdxvcsDHnqNTaxL2AFjBY+2TyGKevu"
            "cFcAAlWFJJYle3EJlDCrQ+y3A8=\n"
        ),
        30055305,
        "mXfgRcJ0bG0j3CPdKwgGWtUzBUbX67saZGRmFuJGGsM=",
    ),
    (
        (
            "go.sum database tree\n31700353\nqINS1GRFhWHwdkUeqLEoP4yEMkTBBzxBkGwGQlVlVcs=\n\n"
            "\u2014 sum.golang.org Az3grnmrIUEDFqHzAElIQCPNoRFRAAdFo47fooyWKMHb89k11GJh5zHIfNCOBmwn/C3"
            "YI8oW9/C8DJ87F61QqspBYwM=\n"
        ),
        31700353,
        "qINS1GRFhWHwdkUeqLEoP4yEMkTBBzxBkGwGQlVlVcs=",
    ),
]


def _signed() -> str:
    return sign_checkpoint(CHECKPOINT, LOG_KEY, ORIGIN)


def _body_and_signatures(note: str) -> tuple[str, str]:
    split = note.rfind("\n\n")
    return note[: split + 1], note[split + 2 :]


# --- Round trip and layout. ---------------------------------------------------------------


def test_signed_checkpoint_verifies_with_the_key_string() -> None:
    assert parse_and_verify(_signed(), LOG_VERIFIER) == CHECKPOINT


def test_signed_checkpoint_verifies_with_name_and_public_key() -> None:
    verifier = NoteVerifier(ORIGIN, LOG_KEY.public_key())
    assert parse_and_verify(_signed(), verifier) == CHECKPOINT
    assert parse_and_verify(_signed().encode(), verifier, expected_origin=ORIGIN) == CHECKPOINT


def test_signed_checkpoint_has_the_tlog_checkpoint_layout() -> None:
    note = _signed()
    body, signatures = _body_and_signatures(note)
    assert body == f"{ORIGIN}\n1000003\n{base64.b64encode(ROOT).decode()}\n"
    assert note == body + "\n" + signatures
    name_part, encoded = signatures.removesuffix("\n").rsplit(" ", 1)
    assert name_part == f"\u2014 {ORIGIN}"
    raw = base64.b64decode(encoded, validate=True)
    public = LOG_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert raw[:4] == hashlib.sha256(ORIGIN.encode() + b"\n\x01" + public).digest()[:4]
    LOG_KEY.public_key().verify(raw[4:], body.encode())


def test_key_id_is_the_signed_note_ed25519_key_hash() -> None:
    public = LOG_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    expected = hashlib.sha256(ORIGIN.encode() + b"\n" + b"\x01" + public).digest()[:4]
    assert key_id(ORIGIN, LOG_KEY.public_key()) == expected
    encoded_key = base64.b64encode(b"\x01" + public).decode()
    assert f"{ORIGIN}+{expected.hex()}+{encoded_key}" == LOG_VERIFIER


def test_extension_lines_round_trip() -> None:
    checkpoint = Checkpoint(ORIGIN, 5, ROOT, ("Timestamp: 1700000000", "more"))
    note = sign_checkpoint(checkpoint, LOG_KEY, ORIGIN)
    assert note.startswith(checkpoint.note_text() + "\n")
    assert checkpoint.note_text().endswith("\nTimestamp: 1700000000\nmore\n")
    assert parse_and_verify(note, LOG_VERIFIER) == checkpoint


def test_empty_tree_checkpoint_round_trips() -> None:
    empty = Checkpoint(ORIGIN, 0, hashlib.sha256(b"").digest())
    assert parse_and_verify(sign_checkpoint(empty, LOG_KEY, ORIGIN), LOG_VERIFIER) == empty


def test_checkpoint_from_another_origin_is_refused_when_an_origin_is_expected() -> None:
    with pytest.raises(CheckpointError):
        parse_and_verify(_signed(), LOG_VERIFIER, expected_origin="audit.phivault.example/other")


# --- Tampering. ---------------------------------------------------------------------------


def _flip_signature_byte(note: str) -> str:
    body, signatures = _body_and_signatures(note)
    prefix, encoded = signatures.removesuffix("\n").rsplit(" ", 1)
    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 0x01
    return f"{body}\n{prefix} {base64.b64encode(bytes(raw)).decode()}\n"


def _flip_key_id_byte(note: str) -> str:
    body, signatures = _body_and_signatures(note)
    prefix, encoded = signatures.removesuffix("\n").rsplit(" ", 1)
    raw = bytearray(base64.b64decode(encoded))
    raw[0] ^= 0x01
    return f"{body}\n{prefix} {base64.b64encode(bytes(raw)).decode()}\n"


OTHER_ROOT = base64.b64encode(hashlib.sha256(b"other root").digest()).decode()
TAMPERINGS: dict[str, Callable[[str], str]] = {
    "size": lambda note: note.replace("\n1000003\n", "\n1000004\n"),
    "size-shrunk": lambda note: note.replace("\n1000003\n", "\n1000002\n"),
    "root": lambda note: note.replace(base64.b64encode(ROOT).decode(), OTHER_ROOT),
    "origin": lambda note: note.replace(f"{ORIGIN}\n", "audit.phivault.example/hospital-8\n", 1),
    "extension-line-added": lambda note: note.replace("=\n\n", "=\nextra\n\n", 1),
    "signature": _flip_signature_byte,
    "key-id": _flip_key_id_byte,
    "key-name": lambda note: note.replace(f"\u2014 {ORIGIN} ", "\u2014 someone.else ", 1),
    "hyphen-for-em-dash": lambda note: note.replace("\u2014 ", "- "),
    "en-dash-for-em-dash": lambda note: note.replace("\u2014 ", "\u2013 "),
    "em-dash-missing": lambda note: note.replace("\u2014 ", ""),
    "em-dash-without-space": lambda note: note.replace("\u2014 ", "\u2014"),
    "signature-line-dropped": lambda note: _body_and_signatures(note)[0] + "\n",
    "blank-line-dropped": lambda note: note.replace("\n\n", "\n"),
    "final-newline-dropped": lambda note: note.removesuffix("\n"),
    "trailing-text": lambda note: note + "trailing\n",
    "crlf": lambda note: note.replace("\n", "\r\n"),
    "signature-truncated": lambda note: note[:-5] + "\n",
}


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_tampered_checkpoint_is_refused(tamper: Callable[[str], str]) -> None:
    tampered = tamper(_signed())
    assert tampered != _signed()
    with pytest.raises(CheckpointError):
        parse_and_verify(tampered, LOG_VERIFIER)


def test_checkpoint_signed_by_another_key_is_refused() -> None:
    forged = sign_checkpoint(CHECKPOINT, WITNESS_KEY, ORIGIN)
    with pytest.raises(CheckpointError):
        parse_and_verify(forged, LOG_VERIFIER)
    with pytest.raises(CheckpointError):
        parse_and_verify(_signed(), verifier_key(ORIGIN, WITNESS_KEY.public_key()))


def test_verifier_under_another_name_is_refused() -> None:
    with pytest.raises(CheckpointError):
        parse_and_verify(_signed(), verifier_key("audit.other.example", LOG_KEY.public_key()))


def test_signatures_by_unknown_keys_are_ignored() -> None:
    note = _signed()
    body, _ = _body_and_signatures(note)
    cosigned = sign_note(body, WITNESS_KEY, "witness.example/w1")
    witness_line = _body_and_signatures(cosigned)[1]
    assert parse_and_verify(note + witness_line, LOG_VERIFIER) == CHECKPOINT
    witness_first = body + "\n" + witness_line + _body_and_signatures(note)[1]
    assert parse_and_verify(witness_first, LOG_VERIFIER) == CHECKPOINT
    witness = verifier_key("witness.example/w1", WITNESS_KEY.public_key())
    assert parse_and_verify(witness_first, witness) == CHECKPOINT


def test_a_bad_signature_claiming_the_trusted_key_spoils_the_note() -> None:
    note = _signed()
    bad_line = _body_and_signatures(_flip_signature_byte(note))[1]
    with pytest.raises(CheckpointError):
        parse_and_verify(note + bad_line, LOG_VERIFIER)


# --- Hostile input. -----------------------------------------------------------------------


MALFORMED_NOTES: dict[str, str | bytes] = {
    "empty": "",
    "only-newlines": "\n\n\n",
    "no-signature-block": f"{ORIGIN}\n1\nroot\n",
    "tab": "x\ty\n\n\u2014 a AAAAAAA=\n",
    "nul": "x\x00\n\n\u2014 a AAAAAAA=\n",
    "invalid-utf8": b"\xff\xfe\n\n" + "\u2014 a AAAAAAA=\n".encode(),
    "lone-surrogate": "\ud800\n\n\u2014 a AAAAAAA=\n",
    "too-long": "x" * (MAX_NOTE_BYTES + 1),
    "too-long-bytes": b"x" * (MAX_NOTE_BYTES + 1),
    "name-with-plus": "x\n\n\u2014 a+b AAAAAAA=\n",
    "signature-too-short": "x\n\n\u2014 a AAAA\n",
    "signature-not-base64": "x\n\n\u2014 a A!AAAAA=\n",
    "signature-unpadded": "x\n\n\u2014 a AAAAAAA\n",
}


@pytest.mark.parametrize("note", MALFORMED_NOTES.values(), ids=MALFORMED_NOTES.keys())
def test_malformed_note_is_refused(note: str | bytes) -> None:
    with pytest.raises(CheckpointError):
        parse_and_verify(note, LOG_VERIFIER)


def test_too_many_signatures_are_refused() -> None:
    note = _signed()
    line = _body_and_signatures(note)[1]
    assert parse_and_verify(note + line * (MAX_SIGNATURES - 1), LOG_VERIFIER) == CHECKPOINT
    with pytest.raises(CheckpointError):
        parse_and_verify(note + line * MAX_SIGNATURES, LOG_VERIFIER)


ROOT_B64 = base64.b64encode(ROOT).decode()
URLSAFE_ROOT = base64.urlsafe_b64encode(b"\xff" * 32).decode()
MALFORMED_BODIES = {
    "leading-zero": f"{ORIGIN}\n042\n{ROOT_B64}\n",
    "negative": f"{ORIGIN}\n-1\n{ROOT_B64}\n",
    "plus-sign": f"{ORIGIN}\n+1\n{ROOT_B64}\n",
    "spaces": f"{ORIGIN}\n 1\n{ROOT_B64}\n",
    "underscore": f"{ORIGIN}\n1_000\n{ROOT_B64}\n",
    "non-ascii-digits": f"{ORIGIN}\n\u0661\u0662\n{ROOT_B64}\n",
    "too-big": f"{ORIGIN}\n{2**64}\n{ROOT_B64}\n",
    "far-too-big": f"{ORIGIN}\n{'9' * 5000}\n{ROOT_B64}\n",
    "empty-size": f"{ORIGIN}\n\n{ROOT_B64}\n",
    "hex-root": f"{ORIGIN}\n1\n{ROOT.hex()}\n",
    "short-root": f"{ORIGIN}\n1\n{base64.b64encode(ROOT[:31]).decode()}\n",
    "long-root": f"{ORIGIN}\n1\n{base64.b64encode(ROOT + b'x').decode()}\n",
    "unpadded-root": f"{ORIGIN}\n1\n{ROOT_B64.rstrip('=')}\n",
    "urlsafe-root": f"{ORIGIN}\n1\n{URLSAFE_ROOT}\n",
    "non-canonical-root": f"{ORIGIN}\n1\n{ROOT_B64[:-2]}{chr(ord(ROOT_B64[-2]) + 1)}=\n",
    "empty-origin": f"\n1\n{ROOT_B64}\n",
    "two-lines": f"{ORIGIN}\n1\n",
    "blank-extension-line": f"{ORIGIN}\n1\n{ROOT_B64}\n\next\n",
}


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_validly_signed_malformed_checkpoint_body_is_refused(body: str) -> None:
    with pytest.raises(CheckpointError):
        parse_and_verify(sign_note(body, LOG_KEY, ORIGIN), LOG_VERIFIER)


def test_largest_tree_size_is_accepted() -> None:
    body = f"{ORIGIN}\n{2**64 - 1}\n{ROOT_B64}\n"
    parsed = parse_and_verify(sign_note(body, LOG_KEY, ORIGIN), LOG_VERIFIER)
    assert parsed.size == 2**64 - 1


@pytest.mark.parametrize(
    ("origin", "size", "root", "extensions"),
    [
        ("", 1, ROOT, ()),
        ("two\nlines", 1, ROOT, ()),
        ("bell\x07", 1, ROOT, ()),
        (ORIGIN, -1, ROOT, ()),
        (ORIGIN, 2**64, ROOT, ()),
        (ORIGIN, 1, ROOT[:31], ()),
        (ORIGIN, 1, ROOT, ("",)),
        (ORIGIN, 1, ROOT, ("a\nb",)),
    ],
)
def test_invalid_checkpoint_values_are_refused(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    with pytest.raises(CheckpointError):
        Checkpoint(origin, size, root, extensions)


@pytest.mark.parametrize("name", ["", "has space", "a+b", "tab\tname", "nbsp\u00a0name"])
def test_signing_under_an_invalid_key_name_is_refused(name: str) -> None:
    with pytest.raises(CheckpointError):
        sign_checkpoint(CHECKPOINT, LOG_KEY, name)


def test_note_text_without_final_newline_cannot_be_signed() -> None:
    with pytest.raises(CheckpointError):
        sign_note("no newline", LOG_KEY, ORIGIN)


# --- Key strings, with Go's known answers. ------------------------------------------------


def test_go_example_verifier_key_parses() -> None:
    verifier = parse_verifier_key(PETER_VERIFIER)
    assert verifier.name == "PeterNeumann"
    assert verifier.key_id.hex() == "c74f20a3"
    assert verifier.key_string() == PETER_VERIFIER


def test_go_example_signer_key_parses_and_matches_its_verifier_key() -> None:
    name, private_key = parse_signer_key(PETER_SIGNER)
    assert name == "PeterNeumann"
    assert verifier_key(name, private_key.public_key()) == PETER_VERIFIER
    assert signer_key(name, private_key) == PETER_SIGNER


def test_go_example_note_is_signed_byte_for_byte() -> None:
    # Ed25519 is deterministic, so Go's published output is a known answer for signing.
    name, private_key = parse_signer_key(PETER_SIGNER)
    assert sign_note(NEUMANN_TEXT, private_key, name) == NEUMANN_TEXT + "\n" + PETER_SIGNATURE


def test_go_example_note_opens() -> None:
    assert open_note(NEUMANN_TEXT + "\n" + PETER_SIGNATURE, PETER_VERIFIER) == NEUMANN_TEXT


def test_go_example_doubly_signed_note_opens_for_either_signer() -> None:
    note = NEUMANN_TEXT + "\n" + PETER_SIGNATURE + ENOCH_SIGNATURE
    assert open_note(note, PETER_VERIFIER) == NEUMANN_TEXT
    assert open_note(note, ENOCH_VERIFIER) == NEUMANN_TEXT


def test_go_example_note_with_corrupted_signature_is_refused() -> None:
    corrupted = PETER_SIGNATURE[:60] + "ABCD" + PETER_SIGNATURE[60:]
    with pytest.raises(CheckpointError):
        open_note(NEUMANN_TEXT + "\n" + corrupted, PETER_VERIFIER)


@pytest.mark.parametrize(("note", "size", "root"), GO_SUMDB_CHECKPOINTS, ids=["2024-09-23", "tessera-test"])
def test_published_go_checksum_database_checkpoint_verifies(note: str, size: int, root: str) -> None:
    checkpoint = parse_and_verify(note, GO_SUMDB_VERIFIER, expected_origin="go.sum database tree")
    assert checkpoint == Checkpoint("go.sum database tree", size, base64.b64decode(root))


def test_published_go_checksum_database_checkpoint_with_changed_size_is_refused() -> None:
    note = GO_SUMDB_CHECKPOINTS[0][0].replace("30055305", "30055306")
    with pytest.raises(CheckpointError):
        parse_and_verify(note, GO_SUMDB_VERIFIER)


def test_every_mangling_of_a_verifier_key_is_refused() -> None:
    # As golang.org/x/mod/sumdb/note's TestNewVerifier: every proper substring and every
    # single-character change of a valid key must be refused.
    key = PETER_VERIFIER
    for start in range(len(key) + 1):
        for end in range(start + 1, len(key) + 1):
            if (start, end) != (0, len(key)):
                with pytest.raises(CheckpointError):
                    parse_verifier_key(key[start:end])
    for position in range(len(key)):
        mangled = key[:position] + chr(ord(key[position]) + 1) + key[position + 1 :]
        with pytest.raises(CheckpointError):
            parse_verifier_key(mangled)


@pytest.mark.parametrize(
    "key",
    [
        # From note_test.go: wrong key length, and unknown algorithm, each with a matching hash.
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "",
        "PeterNeumann",
        "PeterNeumann+c74f20a3",
        "PeterNeumann+C74F20A3X+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_invalid_verifier_keys_are_refused(key: str) -> None:
    with pytest.raises(CheckpointError):
        parse_verifier_key(key)


@pytest.mark.parametrize(
    "key",
    [
        PETER_VERIFIER,
        PETER_SIGNER.replace("c74f20a3", "c74f20a4"),
        PETER_SIGNER.replace("PRIVATE+KEY", "PUBLIC+KEY"),
        PETER_SIGNER.replace("PeterNeumann", "PeterNeuman"),
        PETER_SIGNER[:-4],
    ],
)
def test_invalid_signer_keys_are_refused(key: str) -> None:
    with pytest.raises(CheckpointError):
        parse_signer_key(key)
