from __future__ import annotations

import pytest

from phivault.accounts.passwords import (
    Argon2idHasher,
    PasswordPolicy,
    Pbkdf2Hasher,
    common_passwords,
    hasher_for,
    normalise,
    one_time_password,
    policy_violations,
)
from phivault.config.settings import SettingsError, load_settings


def test_argon2id_uses_at_least_the_owasp_parameters() -> None:
    encoded = Argon2idHasher(19_456, 2).hash("correct horse battery staple")
    assert encoded.startswith("$argon2id$v=19$m=19456,t=2,p=1$")


def test_fips_mode_uses_pbkdf2_sha256_with_600000_iterations() -> None:
    hasher = hasher_for(load_settings(fips=True))
    encoded = hasher.hash("correct horse battery staple")
    assert encoded.startswith("$pbkdf2-sha256$i=600000$")
    assert hasher.verify(encoded, "correct horse battery staple")
    assert not hasher.verify(encoded, "correct horse battery stapler")


@pytest.mark.parametrize(
    ("setting", "value"),
    [("argon2_memory_kib", 8192), ("argon2_time_cost", 1), ("pbkdf2_iterations", 100_000)],
)
def test_weaker_hash_parameters_are_refused(setting: str, value: int) -> None:
    with pytest.raises(SettingsError, match=f"PHIVAULT_{setting.upper()}"):
        load_settings(**{setting: value})


def test_each_hasher_verifies_the_other_kind_and_asks_for_a_rehash() -> None:
    argon, pbkdf2 = Argon2idHasher(19_456, 2), Pbkdf2Hasher(600_000)
    old = argon.hash("a passphrase of some length")
    assert pbkdf2.verify(old, "a passphrase of some length")
    assert pbkdf2.needs_rehash(old)
    fips = pbkdf2.hash("a passphrase of some length")
    assert argon.verify(fips, "a passphrase of some length")
    assert argon.needs_rehash(fips)
    assert Argon2idHasher(19_456, 3).needs_rehash(old)
    assert not argon.needs_rehash(old)
    assert Pbkdf2Hasher(700_000).needs_rehash(fips)


@pytest.mark.parametrize("encoded", ["", "$argon2id$garbage", "$pbkdf2-sha256$i=1$!!$!!", "plain"])
def test_malformed_hashes_never_verify(encoded: str) -> None:
    assert not Argon2idHasher(19_456, 2).verify(encoded, "x")
    assert not Pbkdf2Hasher(600_000).verify(encoded, "x")


def test_common_list_is_bundled_and_complete() -> None:
    common = common_passwords()
    assert len(common) > 95_000
    assert {"123456", "password", "iloveyou"} <= common


@pytest.mark.parametrize(
    ("password", "reasons"),
    [
        ("eleven char", ["too_short"]),
        ("a perfectly good passphrase", []),
        ("1234567890123", ["common_password"]),
        ("PASSWORD1234", ["common_password"]),  # compared case-insensitively
        ("mr smith's secret words", ["contains_context_word"]),
        ("st example rocks forever", ["contains_context_word"]),
        ("my phivault passphrase", ["contains_context_word"]),
        ("x" * 1025, ["too_long"]),
        ("\u00e9" * 64, []),  # 64 characters of any script are allowed
    ],
)
def test_policy_reasons(password: str, reasons: list[str]) -> None:
    found = policy_violations(
        PasswordPolicy(), password, email="smith@example.org", context_words=("St Example",)
    )
    assert found == reasons


def test_composition_rules_apply_only_when_switched_on() -> None:
    strict = PasswordPolicy(
        require_uppercase=True, require_lowercase=True, require_digit=True, require_symbol=True
    )
    assert policy_violations(PasswordPolicy(), "all lower case words", email="a@b.c") == []
    assert policy_violations(strict, "all lower case words", email="a@b.c") == [
        "needs_uppercase",
        "needs_digit",
        "needs_symbol",
    ]
    assert policy_violations(strict, "Mixed case, 4 words!", email="a@b.c") == []


def test_passwords_are_nfkc_normalised_and_nothing_else() -> None:
    assert normalise("\uff21\uff22") == "AB"  # full-width letters
    assert normalise(" Case Kept ") == " Case Kept "


def test_one_time_passwords_are_random_and_pass_the_policy() -> None:
    values = {one_time_password() for _ in range(50)}
    assert len(values) == 50
    for value in values:
        assert policy_violations(PasswordPolicy(), value, email="operator@localhost") == []
