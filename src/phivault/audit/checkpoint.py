r"""Signed checkpoints: the audit log's tree heads, in formats an outside auditor already has tools for.

Two formats, both from the transparency-log ecosystem, so Go's ``golang.org/x/mod/sumdb/note``
(``note.NewVerifier``, ``note.Open``) and the transparency-dev tooling can check phivault's
checkpoints without phivault code:

* **signed note** (c2sp.org/signed-note, golang.org/x/mod/sumdb/note): a UTF-8 text ending in a
  newline, a blank line, then one line per signature, ``— <key name> <base64(key ID ||
  signature)>`` with U+2014 EM DASH. An Ed25519 key ID is the first four bytes of
  ``SHA-256(key name || 0x0A || 0x01 || public key)``; the signature covers the text including
  its final newline. Keys travel as ``<name>+<hex key ID>+<base64(0x01 || public key)>``
  (verifier key) and ``PRIVATE+KEY+<name>+<hex key ID>+<base64(0x01 || seed)>`` (signer key).
* **checkpoint** (c2sp.org/tlog-checkpoint, transparency-dev/formats ``log/README.md``): a note
  whose text is ``<origin>\n<decimal size>\n<base64 root hash>\n`` and optional non-empty
  extension lines.

Parsing treats its input as hostile: size and signature-count limits, strict UTF-8, canonical
base64 and decimal only, and every failure is the one :class:`CheckpointError`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from phivault.audit.errors import CheckpointError
from phivault.audit.merkle import HASH_SIZE, MAX_TREE_SIZE

__all__ = [
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "Checkpoint",
    "NoteVerifier",
    "key_id",
    "open_note",
    "parse_and_verify",
    "parse_signer_key",
    "parse_verifier_key",
    "sign_checkpoint",
    "sign_note",
    "signer_key",
    "verifier_key",
]

MAX_NOTE_BYTES = 256 * 1024
"""Largest note accepted. c2sp.org/signed-note asks verifiers to accept at least 16 signatures,
and post-quantum ones approach 5 kB each; an Ed25519 checkpoint is a few hundred bytes."""

MAX_SIGNATURES = 100
"""Most signature lines accepted in one note (golang.org/x/mod/sumdb/note refuses over 100)."""

_SIGNATURE_PREFIX = "\u2014 "  # EM DASH, SPACE
_ALGORITHM_ED25519 = b"\x01"  # c2sp.org/signed-note "Signature types": 0x01 is Ed25519
_KEY_ID_SIZE = 4
_ED25519_SIGNATURE_SIZE = 64
_ED25519_KEY_SIZE = 32
_SIGNER_KEY_PREFIX = "PRIVATE+KEY+"
_MANDATORY_LINES = 3  # tlog-checkpoint: origin, tree size, root hash

# signed-note: "MUST NOT contain any ASCII control characters (those below U+0020) other than
# newline".
_FORBIDDEN_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
# tlog-checkpoint: "ASCII decimal ... with no leading zeroes"; 20 digits hold 2**64 - 1.
_DECIMAL_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")
_KEY_ID_HEX = re.compile(r"[0-9a-fA-F]{8}")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError("text is not valid UTF-8") from None


def _check_key_name(name: str) -> None:
    # signed-note: "Key names MUST be non-empty and MUST NOT contain any Unicode spaces or plus
    # (U+002B) characters."
    if (
        not isinstance(name, str)
        or not name
        or "+" in name
        or any(character.isspace() for character in name)
        or _FORBIDDEN_CONTROL.search(name)
    ):
        raise CheckpointError("a key name is non-empty and has no spaces or '+'")
    _utf8(name)


def _b64decode(text: str) -> bytes:
    """Decode standard base64 (RFC 4648 §4), padded and canonical; refuse anything else."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError:  # binascii.Error and UnicodeEncodeError are both ValueErrors
        raise CheckpointError("not standard base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise CheckpointError("not canonical standard base64")
    return raw


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    """signed-note "Ed25519 signatures": SHA-256(key name || 0x0A || 0x01 || public key)[:4]."""
    _check_key_name(name)
    material = _utf8(name) + b"\n" + _ALGORITHM_ED25519 + _raw_public_key(public_key)
    return hashlib.sha256(material).digest()[:_KEY_ID_SIZE]


@dataclass(frozen=True, slots=True)
class NoteVerifier:
    """A trusted note key: the name it signs under and its Ed25519 public key."""

    name: str
    public_key: Ed25519PublicKey

    def __post_init__(self) -> None:
        _check_key_name(self.name)
        if not isinstance(self.public_key, Ed25519PublicKey):
            raise CheckpointError("a note verifier needs an Ed25519 public key")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    def key_string(self) -> str:
        """Encode as a verifier key, ``<name>+<hex key ID>+<base64(0x01 || public key)>``."""
        encoded = _b64encode(_ALGORITHM_ED25519 + _raw_public_key(self.public_key))
        return f"{self.name}+{self.key_id.hex()}+{encoded}"


def verifier_key(name: str, public_key: Ed25519PublicKey) -> str:
    """Encode the verifier key string Go's ``note.NewVerifier`` accepts (as ``NewEd25519VerifierKey``)."""
    return NoteVerifier(name, public_key).key_string()


def parse_verifier_key(key_string: str) -> NoteVerifier:
    """Parse ``<name>+<hex key ID>+<base64(0x01 || public key)>``, checking the key ID."""
    if not isinstance(key_string, str) or len(key_string) > MAX_NOTE_BYTES:
        raise CheckpointError("malformed verifier key")
    # The name has no '+', the key ID is hex; only the base64 key may contain '+'.
    name, _, rest = key_string.partition("+")
    hex_id, _, encoded = rest.partition("+")
    _check_key_name(name)
    if not _KEY_ID_HEX.fullmatch(hex_id):
        raise CheckpointError("malformed verifier key")
    key = _b64decode(encoded)
    if len(key) != 1 + _ED25519_KEY_SIZE or key[:1] != _ALGORITHM_ED25519:
        raise CheckpointError("the verifier key is not an Ed25519 note key")
    try:
        public_key = Ed25519PublicKey.from_public_bytes(key[1:])
    except ValueError:
        raise CheckpointError("the verifier key is not an Ed25519 note key") from None
    verifier = NoteVerifier(name, public_key)
    if verifier.key_id != bytes.fromhex(hex_id):
        raise CheckpointError("the verifier key's ID does not match its name and key")
    return verifier


def signer_key(name: str, private_key: Ed25519PrivateKey) -> str:
    """Encode the signer key string Go's ``note.NewSigner`` accepts; it is a secret."""
    seed = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    hex_id = key_id(name, private_key.public_key()).hex()
    return f"{_SIGNER_KEY_PREFIX}{name}+{hex_id}+{_b64encode(_ALGORITHM_ED25519 + seed)}"


def parse_signer_key(key_string: str) -> tuple[str, Ed25519PrivateKey]:
    """Parse ``PRIVATE+KEY+<name>+<hex key ID>+<base64(0x01 || seed)>`` into name and key."""
    if (
        not isinstance(key_string, str)
        or len(key_string) > MAX_NOTE_BYTES
        or not key_string.startswith(_SIGNER_KEY_PREFIX)
    ):
        raise CheckpointError("malformed signer key")
    name, _, rest = key_string.removeprefix(_SIGNER_KEY_PREFIX).partition("+")
    hex_id, _, encoded = rest.partition("+")
    _check_key_name(name)
    if not _KEY_ID_HEX.fullmatch(hex_id):
        raise CheckpointError("malformed signer key")
    seed = _b64decode(encoded)
    if len(seed) != 1 + _ED25519_KEY_SIZE or seed[:1] != _ALGORITHM_ED25519:
        raise CheckpointError("the signer key is not an Ed25519 note key")
    private_key = Ed25519PrivateKey.from_private_bytes(seed[1:])
    # The key ID is of the public key, so it can only be checked after deriving it.
    if key_id(name, private_key.public_key()) != bytes.fromhex(hex_id):
        raise CheckpointError("the signer key's ID does not match its name and key")
    return name, private_key


def _check_note_text(text: str) -> bytes:
    if not isinstance(text, str) or not text.endswith("\n"):
        raise CheckpointError("note text must end with a newline")
    if _FORBIDDEN_CONTROL.search(text):
        raise CheckpointError("note text must not contain control characters")
    encoded = _utf8(text)
    if len(encoded) > MAX_NOTE_BYTES:
        raise CheckpointError("note text is too long")
    return encoded


def sign_note(text: str, private_key: Ed25519PrivateKey, key_name: str) -> str:
    """Sign ``text`` as a signed note with one Ed25519 signature line."""
    message = _check_note_text(text)
    signature = key_id(key_name, private_key.public_key()) + private_key.sign(message)
    return f"{text}\n{_SIGNATURE_PREFIX}{key_name} {_b64encode(signature)}\n"


def _decode_note(note: str | bytes) -> str:
    if isinstance(note, str):
        if len(note) > MAX_NOTE_BYTES:  # a character is at least one byte
            raise CheckpointError("note is too long")
        if len(_utf8(note)) > MAX_NOTE_BYTES:
            raise CheckpointError("note is too long")
        return note
    if not isinstance(note, bytes) or len(note) > MAX_NOTE_BYTES:
        raise CheckpointError("note is too long")
    try:
        return note.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError("note is not valid UTF-8") from None


def _parse_signature_line(line: str) -> tuple[str, bytes]:
    """Split ``— <key name> <base64(key ID || signature)>`` into name and decoded bytes."""
    if not line.startswith(_SIGNATURE_PREFIX):
        raise CheckpointError("malformed signed note")
    name, space, encoded = line.removeprefix(_SIGNATURE_PREFIX).partition(" ")
    if not space:
        raise CheckpointError("malformed signed note")
    _check_key_name(name)
    signature = _b64decode(encoded)
    if len(signature) <= _KEY_ID_SIZE:
        raise CheckpointError("malformed signed note")
    return name, signature


def open_note(note: str | bytes, verifier: NoteVerifier | str) -> str:
    """Return the text of a signed note once a signature by ``verifier`` is checked.

    c2sp.org/signed-note: signatures by other keys (witness cosignatures, a rotated key) are
    ignored; every signature claiming to be by the verifier's name and key ID must verify;
    at least one must be present.
    """
    trusted = parse_verifier_key(verifier) if isinstance(verifier, str) else verifier
    message = _decode_note(note)
    if _FORBIDDEN_CONTROL.search(message):
        raise CheckpointError("malformed signed note")
    # The text ends at the last blank line: signature lines are never empty.
    split = message.rfind("\n\n")
    if split < 0:
        raise CheckpointError("malformed signed note")
    text, signature_block = message[: split + 1], message[split + 2 :]
    if not signature_block.endswith("\n"):
        raise CheckpointError("malformed signed note")
    lines = signature_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise CheckpointError("too many signatures")
    signed_text = _utf8(text)
    expected_id = trusted.key_id
    verified = False
    for line in lines:
        name, signature = _parse_signature_line(line)
        if name != trusted.name or signature[:_KEY_ID_SIZE] != expected_id:
            continue
        if len(signature) != _KEY_ID_SIZE + _ED25519_SIGNATURE_SIZE:
            raise CheckpointError("note is not validly signed by the expected key")
        try:
            trusted.public_key.verify(signature[_KEY_ID_SIZE:], signed_text)
        except InvalidSignature:
            raise CheckpointError("note is not validly signed by the expected key") from None
        verified = True
    if not verified:
        raise CheckpointError("note is not validly signed by the expected key")
    return text


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: which log (``origin``), how many leaves, and the RFC 9162 root hash."""

    origin: str
    size: int
    root_hash: bytes
    extension_lines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # tlog-checkpoint "Note text": the origin MUST be non-empty, extension lines MUST be
        # non-empty, and no line may hold a newline or (signed-note) a control character.
        for line in (self.origin, *self.extension_lines):
            if not isinstance(line, str) or not line or "\n" in line:
                raise CheckpointError("checkpoint lines must be non-empty single lines")
            if _FORBIDDEN_CONTROL.search(line):
                raise CheckpointError("checkpoint lines must not contain control characters")
            _utf8(line)
        if (
            isinstance(self.size, bool)
            or not isinstance(self.size, int)
            or not 0 <= self.size <= MAX_TREE_SIZE
        ):
            raise CheckpointError("checkpoint size must be an integer from 0 to 2**64 - 1")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise CheckpointError(f"checkpoint root hash must be {HASH_SIZE} bytes")

    def note_text(self) -> str:
        """Write the checkpoint body: origin, decimal size, base64 root hash, extension lines."""
        lines = (self.origin, str(self.size), _b64encode(self.root_hash), *self.extension_lines)
        return "".join(f"{line}\n" for line in lines)

    @classmethod
    def from_note_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint body strictly; only the form :meth:`note_text` writes is accepted."""
        if not text.endswith("\n"):
            raise CheckpointError("malformed checkpoint")
        lines = text[:-1].split("\n")
        if len(lines) < _MANDATORY_LINES:
            raise CheckpointError("malformed checkpoint")
        origin, size_line, root_line, *extension_lines = lines
        if not _DECIMAL_SIZE.fullmatch(size_line):
            raise CheckpointError("malformed checkpoint size")
        checkpoint = cls(origin, int(size_line), _b64decode(root_line), tuple(extension_lines))
        # Belt and braces: the body must be exactly what we would have signed.
        if checkpoint.note_text() != text:
            raise CheckpointError("malformed checkpoint")
        return checkpoint


def sign_checkpoint(checkpoint: Checkpoint, private_key: Ed25519PrivateKey, key_name: str) -> str:
    """Sign ``checkpoint`` with ``key_name``'s Ed25519 key; return the signed note text.

    tlog-checkpoint: the log's key name SHOULD match the origin line.
    """
    return sign_note(checkpoint.note_text(), private_key, key_name)


def parse_and_verify(
    note: str | bytes,
    verifier: NoteVerifier | str,
    *,
    expected_origin: str | None = None,
) -> Checkpoint:
    """Verify a signed checkpoint by ``verifier`` (a :class:`NoteVerifier` or key string).

    Raises :class:`CheckpointError` for anything but a well-formed checkpoint carrying a valid
    signature by that key (and, if given, from ``expected_origin``).
    """
    checkpoint = Checkpoint.from_note_text(open_note(note, verifier))
    if expected_origin is not None and checkpoint.origin != expected_origin:
        raise CheckpointError("checkpoint is from another log")
    return checkpoint
