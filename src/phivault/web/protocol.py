"""The HTTP/1.1 protocol uvicorn runs for phivault, with a deadline for request headers.

uvicorn closes idle keep-alive connections, but a client that sends a request's headers a
byte at a time keeps its connection (and a slot of ``limit_concurrency``) for as long as
it likes: the slowloris attack. Here the headers of every request must be complete within
``header_timeout`` seconds of the connection opening or of the request's first byte.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_HEADER_TIMEOUT = 10.0


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
