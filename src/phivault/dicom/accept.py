"""HTTP content negotiation for DICOMweb (RFC 9110 §12.5.1, PS3.18 §8.7).

DICOMweb clients ask for multipart payloads by the part type
(``multipart/related; type="application/dicom"; transfer-syntax=*``), for single payloads
by media type, often with ``*/*``. ``MediaRange`` keeps the parameters that matter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

MULTIPART: Final = "multipart/related"
_MAX_RANGES: Final = 32


@dataclass(frozen=True, slots=True)
class MediaRange:
    media_type: str  # lower case, "*/*" allowed
    part_type: str | None  # the ``type`` parameter of multipart/related, lower case
    transfer_syntax: str | None  # the ``transfer-syntax`` parameter
    quality: float

    def accepts(self, media_type: str) -> bool:
        kind, _, sub = media_type.partition("/")
        mine, _, my_sub = self.media_type.partition("/")
        return self.media_type == "*/*" or (mine == kind and my_sub in ("*", sub))

    def accepts_part(self, part_type: str) -> bool:
        """For ``multipart/related`` ranges: whether parts of ``part_type`` are acceptable."""
        if self.part_type is None:
            return True
        return MediaRange(self.part_type, None, None, 1.0).accepts(part_type)


def _unquote(value: str) -> str:
    value = value.strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value  # noqa: PLR2004


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of an Accept header, best first; ``*/*`` when there is none."""
    if not header or not header.strip():
        return [MediaRange("*/*", None, None, 1.0)]
    ranges: list[MediaRange] = []
    for item in _split_outside_quotes(header, ",")[:_MAX_RANGES]:
        parts = _split_outside_quotes(item, ";")
        media_type = parts[0].strip().lower()
        if "/" not in media_type:
            continue
        params: dict[str, str] = {}
        for parameter in parts[1:]:
            name, _, value = parameter.partition("=")
            params[name.strip().lower()] = _unquote(value)
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 0.0
        if quality <= 0:
            continue
        part_type = params.get("type")
        ranges.append(
            MediaRange(
                media_type, part_type.lower() if part_type else None, params.get("transfer-syntax"), quality
            )
        )
    return sorted(ranges, key=lambda r: -r.quality)


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    quoted = False
    for character in text:
        if character == '"':
            quoted = not quoted
        if character == separator and not quoted:
            pieces.append("".join(current))
            current = []
        else:
            current.append(character)
    pieces.append("".join(current))
    return pieces


def best_single(ranges: Iterable[MediaRange], offered: Iterable[str]) -> str | None:
    """The first offered media type some range accepts, in the client's order of preference."""
    choices = list(offered)
    for media_range in ranges:
        for choice in choices:
            if media_range.accepts(choice):
                return choice
    return None
