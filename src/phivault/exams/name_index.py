"""Blind-index tokens of patients: find them by name or PatientID without decrypting the PHI store.

A patient's tokens are truncated HMACs (``IngestSecret.blind``, keyed by the institution's
secret) of pieces of its normalised name and of its PatientID, written with the patient
(``phi_patient_tokens``). A query (QIDO-RS ``PatientName``, ``PatientID``) is turned into
tokens the same way; the patients holding all of them are the candidates. Only candidates
are ever decrypted, to check a pattern the tokens cannot decide alone, and only up to
``MAX_CANDIDATES_TO_VERIFY`` of them.

Normalisation (PS3.4 C.2.2.2.4 lets PN matching ignore case; we also ignore accents and
punctuation): Unicode NFKD, combining marks dropped, case folded, every character other
than a letter, a digit or the component separator ``^`` becomes a space. The value's
component groups (``=``, PS3.5 §6.2.1) are indexed word by word; ``value`` tokens and
wildcard verification use the first (alphabetic) group.

Tokens of one name, each ``HMAC(kind, text)`` truncated to 128 bits:

====== ======================================== ==========================================
kind   text                                      answers
====== ======================================== ==========================================
value  the whole normalised alphabetic group     ``Quixworth^Zelphine`` (no wildcard)
first  prefixes (1-8 chars) of the first word    ``Quix*`` — exact, nothing decrypted
word   every word                                 ``*^Zelphine^*``
prefix prefixes (1-8 chars) of every word         ``*^Zel*``
tri    trigrams of every word                     ``*worth*`` (infix)
sound  Soundex code of every word                 ``fuzzymatching=true``
pid    the PatientID, whatever its issuer         ``PatientID`` without ``IssuerOfPatientID``
====== ======================================== ==========================================

What the tokens reveal to someone holding the PHI database but not the secret: how many
tokens a patient has (roughly the length of the name) and which patients share a token
(e.g. the same first letter). Not the letters themselves.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from phivault.exams.phi_models import TOKEN_LENGTH
from phivault.exams.secrets import IngestSecret

MAX_PREFIX: Final = 8
MAX_WORDS: Final = 16  # words indexed per name: bounds the rows a hostile name can create
MAX_WORD: Final = 32
MAX_CANDIDATES_TO_VERIFY: Final = 2000
_TRIGRAM: Final = 3
_NOT_NAME: Final = re.compile(r"[^\w^*?]|_")
_SPACES: Final = re.compile(r" +")
_WILDCARDS: Final = re.compile(r"([*?])")


def _blind(secret: IngestSecret, kind: str, text: str) -> str:
    return secret.blind("patient-token", kind, text)[:TOKEN_LENGTH]


def normalise(text: str, *, keep_wildcards: bool = False) -> str:
    """The matching form of a PN value (or pattern): see the module docstring."""
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    if not keep_wildcards:
        folded = folded.replace("*", " ").replace("?", " ")
    cleaned = _NOT_NAME.sub(" ", folded)
    components = [_SPACES.sub(" ", part).strip() for part in cleaned.split("^")]
    while components and not components[-1]:
        components.pop()  # trailing empty components are not significant (PS3.5 §6.2.1)
    return "^".join(components)


def _groups(name: str) -> list[str]:
    return [normalise(group) for group in name.split("=")]


def _words(normalised: str) -> list[str]:
    return [w[:MAX_WORD] for w in normalised.replace("^", " ").split(" ") if w][:MAX_WORDS]


def soundex(word: str) -> str | None:
    """American Soundex of a Latin word (letters after folding), else None."""
    letters = [c for c in unicodedata.normalize("NFKD", word).upper() if "A" <= c <= "Z"]
    if not letters:
        return None
    codes = {
        **dict.fromkeys("BFPV", "1"),
        **dict.fromkeys("CGJKQSXZ", "2"),
        **dict.fromkeys("DT", "3"),
        "L": "4",
        **dict.fromkeys("MN", "5"),
        "R": "6",
    }
    result = letters[0]
    previous = codes.get(letters[0], "")
    for letter in letters[1:]:
        code = codes.get(letter, "")
        if code and code != previous:
            result += code
        if letter not in "HW":  # H and W do not separate equal codes; vowels do
            previous = code
        if len(result) == 4:  # noqa: PLR2004  # Soundex codes are four characters
            break
    return result.ljust(4, "0")


def _word_tokens(secret: IngestSecret, word: str) -> set[str]:
    tokens = {_blind(secret, "word", word)}
    tokens.update(_blind(secret, "prefix", word[:n]) for n in range(1, min(len(word), MAX_PREFIX) + 1))
    tokens.update(_blind(secret, "tri", word[i : i + _TRIGRAM]) for i in range(len(word) - _TRIGRAM + 1))
    code = soundex(word)
    if code is not None:
        tokens.add(_blind(secret, "sound", code))
    return tokens


def patient_tokens(secret: IngestSecret, *, patient_name: str, patient_id: str) -> frozenset[str]:
    """Every token of one patient (written with its PHI-store row)."""
    tokens: set[str] = set()
    for index, group in enumerate(_groups(patient_name)):
        if index == 0 and group:
            tokens.add(_blind(secret, "value", group))
        words = _words(group)
        if words:
            first = words[0]
            tokens.update(
                _blind(secret, "first", first[:n]) for n in range(1, min(len(first), MAX_PREFIX) + 1)
            )
        for word in words:
            tokens.update(_word_tokens(secret, word))
    if patient_id.strip():
        tokens.add(patient_id_token(secret, patient_id))
    return frozenset(tokens)


def patient_id_token(secret: IngestSecret, patient_id: str) -> str:
    """The token of a PatientID under any issuer."""
    return _blind(secret, "pid", patient_id.strip())


class NamePatternTooBroad(ValueError):
    """The pattern has no literal the index can use (e.g. ``*a*``)."""


@dataclass(frozen=True, slots=True)
class NameQuery:
    """How to answer a PatientName query from the index.

    ``tokens``: a patient must hold all of them (empty: every patient matches).
    ``verify``: the regular expression the candidate's normalised name must match in full,
    or None when the tokens decide alone.
    """

    tokens: frozenset[str]
    verify: re.Pattern[str] | None

    @property
    def matches_everyone(self) -> bool:
        return not self.tokens and self.verify is None

    def accepts(self, patient_name: str) -> bool:
        """Whether a candidate's (decrypted) name matches; True when nothing is to verify."""
        if self.verify is None:
            return True
        return bool(self.verify.fullmatch(_groups(patient_name)[0]))


@dataclass(frozen=True, slots=True)
class _Piece:
    text: str
    starts_word: bool  # preceded by a separator or the start of the value
    ends_word: bool  # followed by a separator or the end of the value
    starts_value: bool


def _pieces(pattern: str) -> list[_Piece]:
    """The literal pieces of a normalised pattern, with what bounds them."""
    pieces: list[_Piece] = []
    parts = _WILDCARDS.split(pattern)
    position = 0
    for index, part in enumerate(parts):
        if part in ("*", "?") or not part:
            position += len(part)
            continue
        before_wildcard = index > 0 and parts[index - 1] in ("*", "?")
        after_wildcard = index + 1 < len(parts) and parts[index + 1] in ("*", "?")
        words = re.split(r"([\^ ])", part)
        real = [(i, w) for i, w in enumerate(words) if w and w not in ("^", " ")]
        for order, (i, word) in enumerate(real):
            first_in_part = order == 0
            last_in_part = order == len(real) - 1
            separated_before = i > 0
            separated_after = i < len(words) - 1
            pieces.append(
                _Piece(
                    text=word[:MAX_WORD],
                    starts_word=separated_before or not (first_in_part and before_wildcard),
                    ends_word=separated_after or not (last_in_part and after_wildcard),
                    starts_value=position == 0 and first_in_part and not separated_before,
                )
            )
        position += len(part)
    return pieces


def name_query(secret: IngestSecret, pattern: str, *, fuzzy: bool = False) -> NameQuery:
    """Tokens (and a check) for a QIDO-RS PatientName value: single value or wildcard
    matching (PS3.4 C.2.2.2.1, C.2.2.2.4), or fuzzy matching (see ``docs/exams.md``).

    Raises ``NamePatternTooBroad`` when no literal of the pattern can use the index.
    """
    normalised = normalise(pattern.split("=", maxsplit=1)[0], keep_wildcards=True)
    if not normalised.replace("*", "").replace("^", "").strip():
        return NameQuery(frozenset(), None)  # "*" (or empty): universal matching
    wildcard = "*" in normalised or "?" in normalised
    pieces = _pieces(normalised)
    tokens: set[str] = set()
    if fuzzy:
        for piece in pieces:
            tokens.update(_fuzzy_tokens(secret, piece))
        if not tokens:
            raise NamePatternTooBroad(pattern)
        return NameQuery(frozenset(tokens), None)
    if not wildcard:
        return NameQuery(frozenset({_blind(secret, "value", normalised)}), None)
    for piece in pieces:
        tokens.update(_wildcard_tokens(secret, piece))
    if not tokens:
        raise NamePatternTooBroad(pattern)
    simple_prefix = (
        normalised.endswith("*")
        and normalised.count("*") == 1
        and "?" not in normalised
        and len(pieces) == 1
        and pieces[0].starts_value
        and len(pieces[0].text) <= MAX_PREFIX
        and pieces[0].text == normalised[:-1]
    )
    if simple_prefix:
        return NameQuery(frozenset(tokens), None)  # the "first" token is the whole answer
    regex = "".join(
        ".*" if part == "*" else "." if part == "?" else re.escape(part)
        for part in _WILDCARDS.split(normalised)
    )
    return NameQuery(frozenset(tokens), re.compile(regex, re.DOTALL))


def _wildcard_tokens(secret: IngestSecret, piece: _Piece) -> Iterable[str]:
    text = piece.text
    if piece.starts_value:
        first = {_blind(secret, "first", text[:MAX_PREFIX])}
        return first | {_blind(secret, "word", text)} if piece.ends_word else first
    if piece.starts_word and piece.ends_word:
        return {_blind(secret, "word", text)}
    if piece.starts_word:
        return {_blind(secret, "prefix", text[:MAX_PREFIX])}
    return {_blind(secret, "tri", text[i : i + _TRIGRAM]) for i in range(len(text) - _TRIGRAM + 1)}


def _fuzzy_tokens(secret: IngestSecret, piece: _Piece) -> Iterable[str]:
    if piece.starts_word and piece.ends_word:
        code = soundex(piece.text)
        return {_blind(secret, "sound", code) if code is not None else _blind(secret, "word", piece.text)}
    return _wildcard_tokens(secret, piece)
