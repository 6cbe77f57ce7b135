"""Password hashing and the password policy.

Hashing: Argon2id (m = 19 MiB, t = 2, p = 1, OWASP's password storage recommendation) or,
with ``PHIVAULT_FIPS=1``, PBKDF2-HMAC-SHA256 with ≥ 600 000 iterations (NIST SP 800-132).
Both kinds verify whichever setting is on, and a hash made with other parameters is
replaced at the next successful sign-in (``needs_rehash``). At most one hash per CPU
core runs at a time: routes run in a thread pool, and without the limit a burst of
sign-ins would hold ~19 MiB per thread and starve every other request of CPU.

Policy (NIST SP 800-63B §3.1.1.2, ASVS 6.2): at least ``min_length`` characters (12 by
default), up to ``MAX_PASSWORD_BYTES``; not on the bundled list of 100 000 common
passwords; not containing the e-mail's local part, the institution's name or "phivault"
(the context-specific words of ASVS 6.1.2). Composition rules exist because some
institutions' policies demand them; they are off unless an institution switches them on.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import os
import re
import secrets
import threading
import unicodedata
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Protocol

from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from phivault.config.settings import Settings

MAX_PASSWORD_BYTES = 1024  # longer input is refused before hashing (a hashing DoS otherwise)
MIN_POLICY_LENGTH = 8  # ASVS 6.2.1: an institution may not go below this
MAX_POLICY_LENGTH = 64  # ...nor demand more than the longest length every client must allow
CONTEXT_WORD_MIN = 3  # shorter fragments would refuse too many good passwords
SERVICE_WORDS = ("phivault",)

_PBKDF2_PREFIX = "$pbkdf2-sha256$"
_PBKDF2_SALT_BYTES = 16
_HASH_SLOTS = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))


def normalise(password: str) -> str:
    """NFKC, as NIST SP 800-63B §5.1.1.2 asks, so the same characters typed on two
    keyboards give the same password. Nothing else is changed (ASVS 6.2.8).
    """
    return unicodedata.normalize("NFKC", password)


def too_long(password: str) -> bool:
    return len(password.encode("utf-8", errors="surrogatepass")) > MAX_PASSWORD_BYTES


class PasswordHasher(Protocol):
    def hash(self, password: str) -> str: ...

    def verify(self, encoded: str, password: str) -> bool:
        """True when ``password`` matches; False for a mismatch or a malformed hash."""
        ...

    def needs_rehash(self, encoded: str) -> bool: ...


class Argon2idHasher:
    def __init__(self, memory_kib: int, time_cost: int) -> None:
        self._hasher = _Argon2(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=1, hash_len=32, salt_len=16, type=Type.ID
        )

    def hash(self, password: str) -> str:
        with _HASH_SLOTS:
            return self._hasher.hash(password)

    def verify(self, encoded: str, password: str) -> bool:
        if encoded.startswith(_PBKDF2_PREFIX):
            return _pbkdf2_verify(encoded, password)
        try:
            with _HASH_SLOTS:
                return self._hasher.verify(encoded, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, encoded: str) -> bool:
        if not encoded.startswith("$argon2id$"):
            return True
        try:
            return self._hasher.check_needs_rehash(encoded)
        except InvalidHashError:
            return True


class Pbkdf2Hasher:
    """PBKDF2-HMAC-SHA256 for FIPS 140 deployments: ``$pbkdf2-sha256$i=N$salt$hash``."""

    def __init__(self, iterations: int) -> None:
        self.iterations = iterations

    def hash(self, password: str) -> str:
        salt = secrets.token_bytes(_PBKDF2_SALT_BYTES)
        digest = _pbkdf2(password, salt, self.iterations)
        return f"{_PBKDF2_PREFIX}i={self.iterations}${_b64(salt)}${_b64(digest)}"

    def verify(self, encoded: str, password: str) -> bool:
        if encoded.startswith("$argon2"):
            # A hash from before FIPS mode was switched on; replaced at this sign-in.
            try:
                with _HASH_SLOTS:
                    return _Argon2().verify(encoded, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False
        return _pbkdf2_verify(encoded, password)

    def needs_rehash(self, encoded: str) -> bool:
        parsed = _pbkdf2_parse(encoded)
        return parsed is None or parsed[0] != self.iterations


def hasher_for(settings: Settings) -> PasswordHasher:
    if settings.fips:
        return Pbkdf2Hasher(settings.pbkdf2_iterations)
    return Argon2idHasher(settings.argon2_memory_kib, settings.argon2_time_cost)


def _pbkdf2(password: str, salt: bytes, iterations: int) -> bytes:
    with _HASH_SLOTS:
        return hashlib.pbkdf2_hmac(
            "sha256", password.encode("utf-8", errors="surrogatepass"), salt, iterations
        )


def _pbkdf2_parse(encoded: str) -> tuple[int, bytes, bytes] | None:
    match = re.fullmatch(r"\$pbkdf2-sha256\$i=(\d{1,9})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)", encoded)
    if match is None:
        return None
    try:
        return int(match[1]), _unb64(match[2]), _unb64(match[3])
    except ValueError:
        return None


def _pbkdf2_verify(encoded: str, password: str) -> bool:
    parsed = _pbkdf2_parse(encoded)
    if parsed is None:
        return False
    iterations, salt, expected = parsed
    return hmac.compare_digest(_pbkdf2(password, salt, iterations), expected)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


# -- policy ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PasswordPolicy:
    min_length: int = 12
    require_uppercase: bool = False
    require_lowercase: bool = False
    require_digit: bool = False
    require_symbol: bool = False


def policy_violations(
    policy: PasswordPolicy, password: str, *, email: str, context_words: tuple[str, ...] = ()
) -> list[str]:
    """Reasons ``password`` (already normalised) is refused; empty when it is acceptable."""
    reasons: list[str] = []
    if len(password) < policy.min_length:
        reasons.append("too_short")
    if too_long(password):
        reasons.append("too_long")
    folded = password.casefold()
    if folded in common_passwords():
        reasons.append("common_password")
    local_part = email.partition("@")[0].casefold()
    words = (local_part, *(word.casefold() for word in context_words), *SERVICE_WORDS)
    if any(len(word) >= CONTEXT_WORD_MIN and word in folded for word in words):
        reasons.append("contains_context_word")
    if policy.require_uppercase and not any(char.isupper() for char in password):
        reasons.append("needs_uppercase")
    if policy.require_lowercase and not any(char.islower() for char in password):
        reasons.append("needs_lowercase")
    if policy.require_digit and not any(char.isdigit() for char in password):
        reasons.append("needs_digit")
    if policy.require_symbol and all(char.isalnum() or char.isspace() for char in password):
        reasons.append("needs_symbol")
    return reasons


@cache
def common_passwords() -> frozenset[str]:
    """The bundled SecLists list (MIT), case-folded; loaded once, on first use."""
    packed = resources.files("phivault.accounts").joinpath("data/top-100000.txt.gz").read_bytes()
    text = gzip.decompress(packed).decode("utf-8", errors="replace")
    return frozenset(line.strip().casefold() for line in text.splitlines() if line.strip())


def one_time_password() -> str:
    """A random initial password: 120 bits in five groups, for the bootstrap operator and
    users created without one. It must be changed at first sign-in (ASVS 6.4.1).
    """
    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"  # no look-alikes (l/1, o/0, i)
    raw = "".join(secrets.choice(alphabet) for _ in range(25))
    return "-".join(raw[i : i + 5] for i in range(0, 25, 5))
