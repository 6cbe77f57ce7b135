"""The multipart/related reader of STOW-RS: parts come out whole however the body is split,
and every malformed body is refused with a stable code, never an unexpected exception.
"""

from __future__ import annotations

import random

import pytest

from phivault.dicom.multipart import (
    HEAD_BYTES,
    MAX_PREAMBLE_BYTES,
    MultipartError,
    MultipartReader,
    Part,
    is_dicom_part,
    parse_media_type,
    stow_boundary,
)

BOUNDARY = "0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"


def body(*parts: bytes, boundary: str = BOUNDARY, part_type: str | None = "application/dicom") -> bytes:
    out = b""
    for payload in parts:
        out += f"--{boundary}\r\n".encode()
        if part_type is not None:
            out += f"Content-Type: {part_type}\r\n".encode()
        out += b"\r\n" + payload + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def read(data: bytes, *, chunk: int | None = None, max_part_bytes: int = 10_000_000) -> list[Part]:
    reader = MultipartReader(BOUNDARY, max_part_bytes=max_part_bytes)
    parts: list[Part] = []
    step = chunk or len(data) or 1
    for start in range(0, len(data), step):
        parts.extend(reader.feed(data[start : start + step]))
    reader.close()
    return parts


def refusal(data: bytes, **kwargs: int) -> MultipartError:
    with pytest.raises(MultipartError) as caught:
        read(data, **kwargs)
    return caught.value


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7, 41, 42, 43, 1000])
def test_parts_come_out_whole_however_the_body_is_split(chunk: int | None) -> None:
    # Payloads that contain CRLFs, dashes and near-misses of the delimiter.
    payloads = [
        b"DICM" + bytes(range(256)) * 3,
        b"\r\n--" + BOUNDARY[:-1].encode() + b"x\r\n",
        b"",
        b"-" * 100 + b"\r\n\r\n",
    ]
    parts = read(body(*payloads), chunk=chunk)
    assert [part.body for part in parts] == payloads
    assert all(part.complete and part.size == len(part.body) for part in parts)
    assert all(part.content_type == "application/dicom" for part in parts)


def test_random_splits_of_a_large_body_give_the_same_parts() -> None:
    rng = random.Random(6)
    payloads = [rng.randbytes(rng.randrange(0, 300_000)) for _ in range(5)]
    data = body(*payloads)
    reader = MultipartReader(BOUNDARY, max_part_bytes=10_000_000)
    parts: list[Part] = []
    position = 0
    while position < len(data):
        step = rng.randrange(1, 70_000)
        parts.extend(reader.feed(data[position : position + step]))
        position += step
    reader.close()
    assert [part.body for part in parts] == payloads


def test_preamble_epilogue_and_transport_padding_are_ignored() -> None:
    data = (
        b"This is a preamble.\r\n"
        + f"--{BOUNDARY}  \t\r\n".encode()
        + b"content-type: Application/DICOM; transfer-syntax=1.2.840.10008.1.2.1\r\n\r\nabc\r\n"
        + f"--{BOUNDARY}\r\n\r\ndef\r\n".encode()
        + f"--{BOUNDARY}--".encode()
        + b"\r\nepilogue --"
        + BOUNDARY.encode()
    )
    parts = read(data)
    assert [part.body for part in parts] == [b"abc", b"def"]
    assert parts[1].content_type is None
    assert all(is_dicom_part(part) for part in parts)


def test_a_part_larger_than_the_limit_keeps_only_its_head_and_the_next_part_is_whole() -> None:
    big = bytes(range(256)) * 1000  # 256 000 bytes
    parts = read(body(big, b"small"), chunk=4096, max_part_bytes=100_000)
    assert not parts[0].complete
    assert parts[0].size == len(big)
    assert parts[0].body == big[:HEAD_BYTES]
    assert parts[1].complete
    assert parts[1].body == b"small"


def test_a_part_exactly_at_the_limit_is_complete() -> None:
    parts = read(body(b"x" * 1000), max_part_bytes=1000)
    assert parts[0].complete


def test_other_part_types_are_recognised() -> None:
    (part,) = read(body(b"{}", part_type="application/dicom+json"))
    assert not is_dicom_part(part)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "multipart_empty"),
        (b"just some bytes, not multipart at all", "multipart_malformed"),
        (body(b"abc", boundary="another-boundary"), "multipart_malformed"),
        (body(b"abc")[:-10], "multipart_truncated"),
        (f"--{BOUNDARY}\r\n\r\nabc".encode(), "multipart_truncated"),
        (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n".encode(), "multipart_truncated"),
        (f"--{BOUNDARY}garbage\r\n\r\nabc\r\n--{BOUNDARY}--".encode(), "multipart_malformed"),
        (f"--{BOUNDARY}\r\nno colon here\r\n\r\nabc\r\n--{BOUNDARY}--".encode(), "multipart_malformed"),
        (f"--{BOUNDARY}\r\nX: ".encode() + b"a" * 20_000, "multipart_malformed"),
        (b"x" * (MAX_PREAMBLE_BYTES + 100), "multipart_malformed"),
    ],
)
def test_malformed_bodies_are_refused_with_a_stable_code(data: bytes, code: str) -> None:
    for chunk in (None, 5):
        error = refusal(data, chunk=chunk) if chunk else refusal(data)
        assert (error.status, error.code) == (400, code)


def test_a_body_with_only_the_close_delimiter_has_no_parts() -> None:
    assert read(f"--{BOUNDARY}--\r\n".encode()) == []


def test_random_garbage_never_raises_anything_but_multipart_error() -> None:
    rng = random.Random(7)
    valid = body(b"DICM" * 50, b"abc")
    for _ in range(2000):
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 6)):
            position = rng.randrange(len(data))
            action = rng.randrange(3)
            if action == 0:
                data[position] = rng.randrange(256)
            elif action == 1:
                del data[position : position + rng.randrange(1, 20)]
            else:
                data[position:position] = rng.randbytes(rng.randrange(1, 20))
        codes: list[str] = []
        try:
            read(bytes(data), chunk=rng.randrange(1, 200))
        except MultipartError as error:
            codes.append(error.code)
        assert all(code.startswith("multipart_") for code in codes)


@pytest.mark.parametrize(
    "content_type",
    [
        f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"',
        f"multipart/related;type=application/dicom;boundary={BOUNDARY}",
        f"Multipart/Related; boundary={BOUNDARY}",  # type defaults to application/dicom
        f'multipart/related; boundary="{BOUNDARY}"; type="application/dicom; transfer-syntax=*"',
    ],
)
def test_stow_content_types_are_accepted(content_type: str) -> None:
    assert stow_boundary(content_type) == BOUNDARY


@pytest.mark.parametrize(
    ("content_type", "status", "code"),
    [
        (None, 415, "unsupported_media_type"),
        ("application/dicom", 415, "unsupported_media_type"),
        ("multipart/form-data; boundary=abc", 415, "unsupported_media_type"),
        ('multipart/related; type="application/dicom+json"; boundary=abc', 415, "unsupported_media_type"),
        ('multipart/related; type="application/dicom"', 400, "multipart_boundary_missing"),
        ('multipart/related; boundary=""', 400, "multipart_boundary_invalid"),
        ("multipart/related; boundary=" + "a" * 71, 400, "multipart_boundary_invalid"),
        ('multipart/related; boundary="ends with space "', 400, "multipart_boundary_invalid"),
        ("multipart/related; boundary=a\\b", 400, "multipart_malformed"),
        ("multipart/related; boundary", 400, "multipart_malformed"),
        ("not a media type", 400, "multipart_malformed"),
    ],
)
def test_other_content_types_are_refused(content_type: str | None, status: int, code: str) -> None:
    with pytest.raises(MultipartError) as caught:
        stow_boundary(content_type)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_media_type_parameters_are_unquoted() -> None:
    parsed = parse_media_type('multipart/related; TYPE="application/dicom"; boundary="a\\"b"')
    assert parsed.essence == "multipart/related"
    assert parsed.parameters == {"type": "application/dicom", "boundary": 'a"b'}
