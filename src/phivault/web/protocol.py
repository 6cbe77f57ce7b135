"""The HTTP/1.1 protocol uvicorn runs for phivault, with a deadline for request headers.

uvicorn closes idle keep-alive connections, but a client that sends a request's headers a
byte at a time keeps its connection (and a slot of ``limit_concurrency``) for as long as
it likes: the slowloris attack. Here the headers of every request must be complete within
``header_timeout`` seconds of the connection opening or of the request's first byte.

Request bodies are handed to the application as the pieces arrived: uvicorn copies every
piece into a ``bytearray`` and copies that again for each ``receive``, which on a busy
event loop (device uploads) costs as much as a third of the TLS decryption does.
"""

from __future__ import annotations

import asyncio
from typing import Any, Self

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_HEADER_TIMEOUT = 10.0


class BodyPieces:
    """A request body received but not yet handed over, kept where uvicorn keeps its
    ``bytearray`` (``cycle.body``): ``+=`` keeps the piece itself, ``len`` is the flow
    control's measure, and ``bytes()`` (uvicorn's ``receive``) gives the piece back
    uncopied when there is one, else joins them once.
    """

    __slots__ = ("_pieces", "_size")

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._size = 0

    def __iadd__(self, piece: bytes) -> Self:
        self._pieces.append(piece)
        self._size += len(piece)
        return self

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        if len(self._pieces) == 1:
            return self._pieces[0]
        return b"".join(self._pieces)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout: float = DEFAULT_HEADER_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401  # uvicorn's signature
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        # uvicorn's on_body (0.54), with the pieces kept as they came: the same checks and
        # the same flow control (reading pauses past HIGH_WATER_LIMIT until ``receive``).
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        if not cycle.body:  # receive() leaves a new bytearray behind
            cycle.body = BodyPieces()  # type: ignore[assignment]  # read only by len() and bytes()
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        # abort, not close: a graceful TLS close waits (up to 30 s) for the peer's
        # close_notify, which a slow client never sends, and the slot stays taken.
        self.transport.abort()


def protocol_with_deadline(header_timeout: float) -> type[HeaderDeadlineProtocol]:
    """A protocol class with the configured deadline (uvicorn instantiates it per connection)."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": header_timeout})
