"""Blind-index tokens of patient names: which patterns the tokens answer, and how."""

from __future__ import annotations

import pytest

from phivault.exams.name_index import (
    NamePatternTooBroad,
    name_query,
    normalise,
    patient_id_token,
    patient_tokens,
    soundex,
)
from phivault.exams.secrets import IngestSecret

SECRET = IngestSecret(uid=b"u" * 32, blind_index=b"b" * 32)
OTHER = IngestSecret(uid=b"u" * 32, blind_index=b"c" * 32)
NAME = "Quixworth^Zelphine^Marguerite"
TOKENS = patient_tokens(SECRET, patient_name=NAME, patient_id="MRN-1")


def _finds(pattern: str, name: str = NAME, *, fuzzy: bool = False) -> bool:
    query = name_query(SECRET, pattern, fuzzy=fuzzy)
    tokens = patient_tokens(SECRET, patient_name=name, patient_id="")
    return query.tokens <= tokens and query.accepts(name)


@pytest.mark.parametrize(
    "pattern",
    [
        "Quixworth^Zelphine^Marguerite",
        "QUIXWORTH^zelphine^MARGUERITE^^",
        "Quix*",
        "quixworth*",
        "*worth*",
        "*^Zel*",
        "Quixworth^Zel*",
        "Q*^M*",
        "Qui?worth*",
        "*",
    ],
)
def test_patterns_that_match(pattern: str) -> None:
    assert _finds(pattern)


@pytest.mark.parametrize("pattern", ["Quixworth", "Zel*", "*worthy*", "Quixworth^Marguerite", "Q?x*"])
def test_patterns_that_do_not_match(pattern: str) -> None:
    assert not _finds(pattern)


def test_accents_case_and_punctuation_are_ignored() -> None:
    assert normalise("Ó'Brïen^Zoë ") == "o brien^zoe"
    assert _finds("o'brien^zoe", "Ó'Brïen^Zoë")
    assert _finds("OBR*", "Obrecht^Anna")


def test_a_simple_prefix_is_answered_by_the_tokens_alone() -> None:
    query = name_query(SECRET, "Quix*")
    assert query.verify is None
    assert len(query.tokens) == 1
    assert name_query(SECRET, "Quixworth^Z*").verify is not None


def test_fuzzy_matching_compares_how_words_sound() -> None:
    assert _finds("Quixwerth^Zelfine", fuzzy=True)
    assert _finds("zelfine", fuzzy=True), "word order and position do not matter"
    assert not _finds("Quixworth^Zelphine", "Smith^John", fuzzy=True)
    assert soundex("Robert") == soundex("Rupert") == "R163"
    assert soundex("Tymczak") == "T522"
    assert soundex("Ashcraft") == "A261"
    assert soundex("Ωμέγα") is None


@pytest.mark.parametrize("pattern", ["*a*", "*ab*", "?*"])
def test_patterns_without_a_usable_literal_are_too_broad(pattern: str) -> None:
    with pytest.raises(NamePatternTooBroad):
        name_query(SECRET, pattern)


def test_tokens_are_keyed_by_the_institution_secret() -> None:
    other = patient_tokens(OTHER, patient_name=NAME, patient_id="MRN-1")
    assert TOKENS.isdisjoint(other)
    assert patient_id_token(SECRET, "MRN-1") in TOKENS
    assert all(len(token) == 32 for token in TOKENS)
    assert not any("quix" in token for token in TOKENS)


def test_a_hostile_name_yields_a_bounded_number_of_tokens() -> None:
    tokens = patient_tokens(SECRET, patient_name=" ".join(["x" * 200] * 500), patient_id="")
    assert len(tokens) < 100
