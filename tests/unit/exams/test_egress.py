"""The egress guard finds a patient's PHI values in outgoing bytes, however they are cut,
cased or encoded, and ignores values too short to mean anything.
"""

from __future__ import annotations

import os
import time

import pytest

from phivault.dicom.deid import DeidOptions
from phivault.dicom.phi import PhiRecord
from phivault.exams.egress import EgressBlocked, EgressGuard, meaningful, record_values

RECORD = PhiRecord(
    patient_name="Quixworth^Zelphine^Marguerite",
    patient_id="MRN-77341920",
    birth_date="19470312",
    sex="F",
    age="079Y",
    referring_physician_name="Orvald^Brennick",
    other=(
        ("(0010,1001)", "Éloïse^Vandermeer"),
        ("(0008,1030)", "ABDOMEN"),  # free text: not matched whole
        ("(0008,0020)", "20240501"),  # a removed date
        ("(0009,1001)", "SAFE-DEVICE-SETTING-42"),  # private: not matched whole
        ("(0040,0275)[0](0032,1032)", "Requestingname^Physician"),
    ),
)


@pytest.fixture
def guard() -> EgressGuard:
    return EgressGuard(record_values(RECORD, DeidOptions()))


@pytest.mark.parametrize(
    "data",
    [
        b"...QUIXWORTH...",
        b"name: zelphine",
        "Quixworth".encode("utf-16-le"),
        "ZELPHINE".encode("utf-16-be"),
        "Vandermeer".encode("latin-1"),
        "ÉLOÏSE".encode(),
        "éloïse".encode("latin-1"),
        b"MRN-77341920",
        b"19470312",
        b"20240501",
        b"Orvald^Brennick",
        b"Requestingname",
        b'{"n": "\\u00c9lo\\u00efse"}',
    ],
)
def test_values_are_found_in_any_case_and_encoding(guard: EgressGuard, data: bytes) -> None:
    assert guard.finds(b"\x00" * 5 + data + b"\xff" * 3)


@pytest.mark.parametrize(
    "data", [b"F", b"079Y", b"ABDOMEN", b"SAFE-DEVICE-SETTING-42", b"1947031", b"Quixwort"]
)
def test_short_values_free_text_and_near_misses_are_not_matched(guard: EgressGuard, data: bytes) -> None:
    assert not guard.finds(data)


def test_meaningful_values_follow_the_documented_lengths() -> None:
    assert not meaningful("Smith")
    assert meaningful("Smithe")
    assert not meaningful("120000")  # a time: digits only, under eight
    assert meaningful("19470312")
    assert not meaningful("ANONYMIZED")


def test_a_value_split_across_chunks_is_caught_before_any_part_of_it_leaves(guard: EgressGuard) -> None:
    chunks = [b"header bytes ... Quix", b"worth and more"]
    sent: list[bytes] = []
    with pytest.raises(EgressBlocked):
        sent.extend(guard.screen(chunks))
    assert b"Quix" not in b"".join(sent)


def test_clean_chunks_pass_through_unchanged(guard: EgressGuard) -> None:
    chunks = [os.urandom(1000) for _ in range(20)]
    assert b"".join(guard.screen(iter(chunks))) == b"".join(chunks)


def test_options_that_keep_an_attribute_leave_its_values_out() -> None:
    record = PhiRecord(other=(("(0008,0020)", "20240501"),))
    assert "20240501" in record_values(record, DeidOptions())
    assert "20240501" not in record_values(record, DeidOptions(retain_modified_dates=True))


def test_one_pass_per_chunk_whatever_the_number_of_values() -> None:
    values = [f"Value{n:05d}Zq" for n in range(500)]
    guard = EgressGuard(values)
    data = os.urandom(8 << 20)
    started = time.perf_counter()
    assert not guard.finds(data)
    assert time.perf_counter() - started < 5  # ~0.3 s here; generous for a loaded CI machine
