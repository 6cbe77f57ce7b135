"""STOW-RS request bodies and readers of Store Instances Responses, for tests."""

from __future__ import annotations

from typing import Any

BOUNDARY = "phivault-test-boundary-7c1f"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'

# DICOM JSON tags of the Store Instances Response (PS3.18 §10.5.3).
RETRIEVE_URL = "00081190"
FAILED_SOP_SEQUENCE = "00081198"
OTHER_FAILURES_SEQUENCE = "0008119A"
REFERENCED_SOP_SEQUENCE = "00081199"
SOP_CLASS = "00081150"
SOP_INSTANCE = "00081155"
WARNING_REASON = "00081196"
FAILURE_REASON = "00081197"
ERROR_COMMENT = "00000902"


def multipart(*parts: bytes, part_type: str = "application/dicom", boundary: str = BOUNDARY) -> bytes:
    body = b""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def items(response: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    sequence = response.get(tag, {"Value": []})
    assert sequence.get("vr") == "SQ"
    found: list[dict[str, Any]] = sequence.get("Value", [])
    return found


def value(item: dict[str, Any], tag: str) -> Any:  # noqa: ANN401  # a DICOM JSON value of any VR
    return item[tag]["Value"][0]
