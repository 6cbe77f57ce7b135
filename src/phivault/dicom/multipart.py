"""Incremental parser of ``multipart/related`` request bodies (RFC 2387; framing RFC 2046 §5.1).

STOW-RS sends instances as ``multipart/related; type="application/dicom"`` (PS3.18 §8.6.1.2,
§10.5.1). The parser is fed the body chunk by chunk as it arrives and hands back each part
as soon as its closing delimiter is seen, so a request is processed part by part and holds
at most one part (plus one chunk) in memory. Bodies are untrusted: every size is bounded,
and every malformation raises :class:`MultipartError` with a stable code, never an
``IndexError`` or ``ValueError`` from deep inside.

Errors never quote the body (it may hold PHI); they may quote header parameter names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

DICOM_MEDIA_TYPE: Final = "application/dicom"
MULTIPART_RELATED: Final = "multipart/related"

# RFC 2046 §5.1.1: a boundary is 1-70 characters from this set, not ending with a space.
_BOUNDARY_RE: Final = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
# RFC 9110 §5.6.2 token and §5.6.4 quoted-string, for media type parameters (§8.3.1).
_TOKEN: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # noqa: S105  # a grammar, not a secret
_QUOTED: Final = r'"(?:[^"\\\r\n]|\\[^\r\n])*"'
_MEDIA_TYPE_RE: Final = re.compile(rf"\s*({_TOKEN})/({_TOKEN})\s*")
# Values are tokens or quoted strings; unquoted ones with "/" (``type=application/dicom``,
# strictly not a token) are common enough in hand-written requests to accept.
_PARAMETER_RE: Final = re.compile(rf"\s*;\s*({_TOKEN})=({_QUOTED}|[^\s;\"\\]+)\s*")
_HEADER_NAME_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

MAX_PREAMBLE_BYTES: Final = 64 * 1024
MAX_HEADER_BYTES: Final = 16 * 1024
HEAD_BYTES: Final = 64 * 1024
"""Of a part too large to keep, this many leading bytes are kept (to name the instance)."""

_CRLF: Final = b"\r\n"
_PADDING: Final = b" \t"  # RFC 2046 §5.1.1 transport-padding after a delimiter


class MultipartError(Exception):
    """The request cannot be read as a STOW-RS body; ``status`` and ``code`` make the problem."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class MediaType:
    """A parsed media type (RFC 9110 §8.3.1): lower-case type and parameter names."""

    essence: str
    parameters: dict[str, str] = field(default_factory=dict)


def parse_media_type(value: str) -> MediaType:
    """Parse a Content-Type value; raises ``ValueError`` if it is not one."""
    match = _MEDIA_TYPE_RE.match(value)
    if match is None:
        raise ValueError("not a media type")
    essence = f"{match[1]}/{match[2]}".lower()
    parameters: dict[str, str] = {}
    position = match.end()
    while position < len(value):
        parameter = _PARAMETER_RE.match(value, position)
        if parameter is None:
            raise ValueError("a media type parameter is malformed")
        name, raw = parameter[1].lower(), parameter[2]
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        parameters[name] = raw
        position = parameter.end()
    return MediaType(essence, parameters)


def stow_boundary(content_type: str | None) -> str:
    """The boundary of a STOW-RS request body, after checking its Content-Type.

    PS3.18 §10.5.1: ``multipart/related`` whose ``type`` is ``application/dicom`` (the
    metadata-and-bulk-data forms, ``application/dicom+json`` and ``+xml``, are not
    accepted). A missing ``type`` is taken as ``application/dicom``.
    """
    if not content_type:
        raise MultipartError(
            415, "unsupported_media_type", 'send multipart/related; type="application/dicom"'
        )
    try:
        media_type = parse_media_type(content_type)
    except ValueError:
        raise MultipartError(400, "multipart_malformed", "the Content-Type header is malformed") from None
    if media_type.essence != MULTIPART_RELATED:
        raise MultipartError(
            415, "unsupported_media_type", 'send multipart/related; type="application/dicom"'
        )
    root_type = media_type.parameters.get("type", DICOM_MEDIA_TYPE)
    if _essence(root_type) != DICOM_MEDIA_TYPE:
        raise MultipartError(
            415, "unsupported_media_type", 'only type="application/dicom" parts are accepted (PS3.18 §10.5)'
        )
    boundary = media_type.parameters.get("boundary")
    if boundary is None:
        raise MultipartError(400, "multipart_boundary_missing", "the Content-Type has no boundary parameter")
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise MultipartError(
            400, "multipart_boundary_invalid", "the boundary is not 1-70 characters of RFC 2046 §5.1.1"
        )
    return boundary


def _essence(value: str) -> str:
    try:
        return parse_media_type(value).essence
    except ValueError:
        return ""


@dataclass(frozen=True, slots=True)
class Part:
    """One body part.

    ``body`` holds the whole part unless it was larger than the reader's limit: then
    ``complete`` is false, ``body`` holds its first ``HEAD_BYTES`` and ``size`` counts
    every byte it had.
    """

    content_type: str | None
    body: bytes
    size: int
    complete: bool


class _State(Enum):
    PREAMBLE = auto()
    DELIMITER_END = auto()  # after "--boundary": "--" closes, else padding and CRLF
    HEADERS = auto()
    BODY = auto()
    EPILOGUE = auto()


class MultipartReader:
    """Feed a ``multipart/related`` body in chunks; get back the parts it completes.

    ``max_part_bytes`` bounds what one part may hold in memory: a larger part is read
    through, kept only as its first bytes, and returned incomplete.
    """

    def __init__(self, boundary: str, *, max_part_bytes: int) -> None:
        self._dash_boundary = b"--" + boundary.encode("ascii")
        # RFC 2046 §5.1.1: the CRLF before a delimiter belongs to the delimiter.
        self._delimiter = _CRLF + self._dash_boundary
        self._max_part_bytes = max_part_bytes
        self._buffer = bytearray()
        self._state = _State.PREAMBLE
        self._preamble_seen = 0
        self._content_type: str | None = None
        self._chunks: list[bytes | bytearray] = []
        self._size = 0
        self._parts = 0

    @property
    def parts(self) -> int:
        """How many parts were completed so far."""
        return self._parts

    def feed(self, data: bytes) -> list[Part]:
        """Add the next bytes of the body; return the parts they complete, in order."""
        if self._state is _State.EPILOGUE:
            return []  # RFC 2046 §5.1.1: the epilogue is ignored
        self._buffer += data
        completed: list[Part] = []
        while True:
            progressed, part = self._step()
            if part is not None:
                completed.append(part)
            if not progressed:
                return completed

    def close(self) -> None:
        """The body ended: raise if it did not end with the close delimiter."""
        if self._state is _State.EPILOGUE:
            return
        if self._state is _State.PREAMBLE or (self._parts == 0 and self._state is _State.DELIMITER_END):
            if not self._buffer and self._preamble_seen == 0:
                raise MultipartError(400, "multipart_empty", "the request body is empty")
            raise MultipartError(
                400, "multipart_malformed", "the body does not start with the boundary of its Content-Type"
            )
        raise MultipartError(
            400, "multipart_truncated", "the body ended before the closing boundary delimiter"
        )

    # -- the state machine (RFC 2046 §5.1.1 grammar) ------------------------------------

    def _step(self) -> tuple[bool, Part | None]:
        match self._state:
            case _State.PREAMBLE:
                return self._preamble(), None
            case _State.DELIMITER_END:
                return self._delimiter_end(), None
            case _State.HEADERS:
                return self._headers(), None
            case _State.BODY:
                return self._body()
            case _State.EPILOGUE:
                self._buffer.clear()
                return False, None

    def _preamble(self) -> bool:
        buffer = self._buffer
        # The first delimiter may start the body (no CRLF before it) or follow a preamble.
        if self._preamble_seen == 0 and buffer.startswith(self._dash_boundary):
            del buffer[: len(self._dash_boundary)]
            self._state = _State.DELIMITER_END
            return True
        if (
            self._preamble_seen == 0
            and len(buffer) < len(self._dash_boundary)
            and self._dash_boundary.startswith(buffer)
        ):
            return False  # could still be the opening delimiter
        index = buffer.find(self._delimiter)
        if index >= 0:
            self._preamble_seen += index
            del buffer[: index + len(self._delimiter)]
            self._state = _State.DELIMITER_END
            return True
        keep = len(self._delimiter) - 1
        if len(buffer) > keep:
            self._preamble_seen += len(buffer) - keep
            del buffer[: len(buffer) - keep]
        if self._preamble_seen > MAX_PREAMBLE_BYTES:
            raise MultipartError(
                400, "multipart_malformed", "the body does not contain the boundary of its Content-Type"
            )
        return False

    def _delimiter_end(self) -> bool:
        buffer = self._buffer
        if len(buffer) < 2:  # noqa: PLR2004  # "--" or CRLF
            return False
        if buffer.startswith(b"--"):
            self._state = _State.EPILOGUE
            buffer.clear()
            return False
        end = buffer.find(_CRLF)
        if end < 0:
            if len(buffer) > MAX_HEADER_BYTES:
                raise MultipartError(400, "multipart_malformed", "a boundary delimiter line is malformed")
            return False
        if buffer[:end].strip(_PADDING):
            # Not padding: the boundary occurs inside something else (RFC 2046 §5.1.1).
            raise MultipartError(400, "multipart_malformed", "a boundary delimiter line is malformed")
        del buffer[: end + 2]
        self._state = _State.HEADERS
        return True

    def _headers(self) -> bool:
        buffer = self._buffer
        if buffer.startswith(_CRLF):  # no header fields
            del buffer[:2]
            self._start_part({})
            return True
        end = buffer.find(_CRLF + _CRLF)
        if end < 0:
            if len(buffer) > MAX_HEADER_BYTES:
                raise MultipartError(400, "multipart_malformed", "a part's header section is too long")
            return False
        if end > MAX_HEADER_BYTES:
            raise MultipartError(400, "multipart_malformed", "a part's header section is too long")
        headers = _parse_headers(bytes(buffer[:end]))
        del buffer[: end + 4]
        self._start_part(headers)
        return True

    def _start_part(self, headers: dict[str, str]) -> None:
        self._content_type = headers.get("content-type")
        self._chunks = []
        self._size = 0
        self._state = _State.BODY

    def _body(self) -> tuple[bool, Part | None]:
        buffer = self._buffer
        index = buffer.find(self._delimiter)
        if index < 0:
            # Keep what could be the start of a delimiter split across chunks.
            movable = len(buffer) - (len(self._delimiter) - 1)
            if movable > 0:
                self._take(movable)
            return False, None
        self._take(index)
        del buffer[: len(self._delimiter)]
        part = self._finish_part()
        self._state = _State.DELIMITER_END
        return True, part

    def _take(self, length: int) -> None:
        """Move the first ``length`` buffered bytes into the current part."""
        buffer = self._buffer
        before = self._size
        self._size += length
        if self._size <= self._max_part_bytes:
            self._chunks.append(buffer[:length])
        elif before <= self._max_part_bytes:
            # Just went past the limit: keep the head only and drop the rest from now on.
            head = bytearray()
            for chunk in [*self._chunks, buffer[: min(length, HEAD_BYTES)]]:
                head += chunk[: HEAD_BYTES - len(head)]
                if len(head) >= HEAD_BYTES:
                    break
            self._chunks = [head]
        del buffer[:length]

    def _finish_part(self) -> Part:
        complete = self._size <= self._max_part_bytes
        body = b"".join(self._chunks)
        self._chunks = []
        self._parts += 1
        return Part(content_type=self._content_type, body=body, size=self._size, complete=complete)


def _parse_headers(block: bytes) -> dict[str, str]:
    """Header fields of a part (RFC 2046 §5.1.1 ``MIME-part-headers``; names lower-cased)."""
    headers: dict[str, str] = {}
    for line in block.split(_CRLF):
        name, colon, value = line.partition(b":")
        if not colon or not _HEADER_NAME_RE.fullmatch(name):
            # Includes obsolete line folding (RFC 5322 §3.2.2), which MIME parts need not use.
            raise MultipartError(400, "multipart_malformed", "a part's header field is malformed")
        headers[name.decode("ascii").lower()] = value.strip(_PADDING).decode("latin-1")
    return headers


def is_dicom_part(part: Part) -> bool:
    """Whether a part declares ``application/dicom`` (a part without Content-Type takes the
    request's ``type``, which :func:`stow_boundary` required to be ``application/dicom``).
    """
    return part.content_type is None or _essence(part.content_type) == DICOM_MEDIA_TYPE
