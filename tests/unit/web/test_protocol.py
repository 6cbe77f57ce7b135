"""The HTTP protocol phivault runs: request body pieces reach the application as they
came (uncopied), in order, with uvicorn's flow control unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.server import ServerState

from phivault.web.protocol import HeaderDeadlineProtocol

HEAD = b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n"


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = 0
        self.resumed = 0
        self.written = bytearray()

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: ANN401  # asyncio's signature
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8443)}.get(name, default)

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def _receive_pieces(pieces: list[bytes], *, together: bool) -> tuple[list[bytes], _Transport]:
    """Send ``pieces`` as one request's body; the bodies of the ``receive`` messages the
    application got, and the transport (to see the flow control).
    """
    received: list[bytes] = []
    fed = asyncio.Event()

    async def app(_scope: dict[str, Any], receive: Any, send: Any) -> None:  # noqa: ANN401  # ASGI
        await fed.wait()
        more = True
        while more:
            message = await receive()
            received.append(message["body"])
            more = message["more_body"]
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = uvicorn.Config(app, http=HeaderDeadlineProtocol, log_config=None, lifespan="off")
    protocol = HeaderDeadlineProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = _Transport()
    protocol.connection_made(transport)
    protocol.data_received(HEAD % sum(map(len, pieces)))
    for piece in pieces:
        protocol.on_body(piece)  # what the parser hands over, piece by piece
        if not together:
            fed.set()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
    protocol.on_message_complete()
    fed.set()
    for _ in range(20):
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    assert transport.written.startswith(b"HTTP/1.1 204 ")
    return received, transport


def test_a_body_piece_reaches_the_application_uncopied() -> None:
    pieces = [bytes([n]) * (256 * 1024) for n in range(3)]
    received, transport = asyncio.run(_receive_pieces(pieces, together=False))
    assert b"".join(received) == b"".join(pieces)
    assert [body is piece for body, piece in zip(received, pieces, strict=False)] == [True] * 3
    assert transport.paused >= 1  # past uvicorn's high-water mark reading pauses …
    assert transport.resumed >= transport.paused  # … until the application asks again


def test_pieces_that_arrive_together_are_joined_in_order() -> None:
    pieces = [b"first ", b"second ", b"third"]
    received, transport = asyncio.run(_receive_pieces(pieces, together=True))
    assert b"".join(received) == b"first second third"
    assert transport.paused == 0  # below the high-water mark nothing pauses
    assert sum(map(len, pieces)) < HIGH_WATER_LIMIT
