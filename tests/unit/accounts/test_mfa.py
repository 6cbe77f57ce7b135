from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pyotp

from phivault.accounts import mfa

NOW = datetime(2026, 3, 1, 12, 0, 10, tzinfo=UTC)


def test_seed_has_160_bits_and_uri_names_issuer_and_account() -> None:
    seed = mfa.new_seed()
    assert len(base64.b32decode(seed)) == 20
    uri = mfa.provisioning_uri(seed, "ada@example.org")
    assert uri.startswith("otpauth://totp/phivault:ada%40example.org?")
    assert f"secret={seed}" in uri
    assert "issuer=phivault" in uri


def test_qr_code_is_an_svg_data_uri() -> None:
    uri = mfa.qr_data_uri("otpauth://totp/phivault:a?secret=ABC&issuer=phivault")
    assert uri.startswith("data:image/svg+xml;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).lstrip().startswith(b"<svg")


def test_rfc6238_window_is_one_step_either_side() -> None:
    seed = mfa.new_seed()
    totp = pyotp.TOTP(seed)
    step = totp.timecode(NOW)
    for offset in (-1, 0, 1):
        code = totp.at(NOW + timedelta(seconds=30 * offset))
        assert mfa.accepted_step(seed, code, NOW, None) == step + offset
    for offset in (-2, 2):
        assert mfa.accepted_step(seed, totp.at(NOW + timedelta(seconds=30 * offset)), NOW, None) is None


def test_a_code_is_accepted_once_and_never_an_older_one() -> None:
    seed = mfa.new_seed()
    code = pyotp.TOTP(seed).at(NOW)
    step = mfa.accepted_step(seed, code, NOW, None)
    assert step is not None
    assert mfa.accepted_step(seed, code, NOW, step) is None
    previous = pyotp.TOTP(seed).at(NOW - timedelta(seconds=30))
    assert mfa.accepted_step(seed, previous, NOW, step) is None


def test_malformed_codes_are_refused() -> None:
    seed = mfa.new_seed()
    for code in ("", "12345", "1234567", "abcdef", " 123456"):
        assert mfa.accepted_step(seed, code, NOW, None) is None


def test_recovery_codes_have_120_bits_and_typing_variants_match() -> None:
    codes = mfa.new_recovery_codes()
    assert len(codes) == len(set(codes)) == 10
    raw = codes[0].replace("-", "")
    assert len(raw) == 24  # 24 base32 characters: 120 bits
    assert mfa.recovery_digest(codes[0]) == mfa.recovery_digest(" " + codes[0].upper().replace("-", " "))
