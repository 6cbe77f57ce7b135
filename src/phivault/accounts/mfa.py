"""TOTP (RFC 6238) and recovery codes.

A code is checked against the current 30-second step and one step either side (clock
drift between phone and server), and is accepted only if its step is later than the last
step accepted for that user, so each code works once (ASVS 6.5.1). Seeds are 160 bits
from ``secrets`` (RFC 4226 §4 recommends 160). Recovery codes carry 120 bits, so a
SHA-256 digest is enough to store them (ASVS 6.5.2).
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
from datetime import datetime
from urllib.parse import quote

import pyotp
import qrcode
import qrcode.image.svg

from phivault.ids import token_digest

ISSUER = "phivault"
DIGITS = 6
STEP_SECONDS = 30
VALID_WINDOW = 1  # steps either side of now
RECOVERY_CODES = 10
_RECOVERY_GROUPS, _RECOVERY_GROUP_LEN = 6, 4  # 24 base32 characters = 120 bits
_CODE_RE = re.compile(r"^[0-9]{6}$")


def new_seed() -> str:
    """A base32 TOTP seed of 160 random bits."""
    return pyotp.random_base32(length=32)


def provisioning_uri(seed: str, account: str) -> str:
    """The ``otpauth://`` URI authenticator apps import (Key Uri Format)."""
    return pyotp.TOTP(seed, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=account, issuer_name=ISSUER
    )


def qr_data_uri(uri: str) -> str:
    """The provisioning URI as an SVG QR code in a ``data:`` URI (no image library needed)."""
    image = qrcode.make(uri, image_factory=qrcode.image.svg.SvgPathImage, border=2)
    svg: bytes = image.to_string()
    return "data:image/svg+xml;base64," + base64.b64encode(svg).decode()


def accepted_step(seed: str, code: str, now: datetime, last_step: int | None) -> int | None:
    """The time step ``code`` belongs to, if it is valid now and not used before."""
    if not _CODE_RE.fullmatch(code):
        return None
    totp = pyotp.TOTP(seed, digits=DIGITS, interval=STEP_SECONDS)
    current = totp.timecode(now)
    matched: int | None = None
    for step in range(current - VALID_WINDOW, current + VALID_WINDOW + 1):
        # Every candidate is computed and compared: the time taken says nothing.
        if hmac.compare_digest(totp.generate_otp(step), code) and matched is None:
            matched = step
    if matched is None or (last_step is not None and matched <= last_step):
        return None
    return matched


def new_recovery_codes() -> list[str]:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    codes = []
    for _ in range(RECOVERY_CODES):
        raw = "".join(secrets.choice(alphabet) for _ in range(_RECOVERY_GROUPS * _RECOVERY_GROUP_LEN))
        codes.append(
            "-".join(raw[i : i + _RECOVERY_GROUP_LEN] for i in range(0, len(raw), _RECOVERY_GROUP_LEN))
        )
    return codes


def recovery_digest(code: str) -> str:
    """Digest of a recovery code as typed: case, spaces and dashes do not matter."""
    return token_digest(re.sub(r"[\s-]", "", code).lower())


def looks_like_totp(code: str) -> bool:
    return bool(_CODE_RE.fullmatch(code))


def account_label(email: str) -> str:
    return quote(email, safe="@.")
