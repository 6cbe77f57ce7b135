"""The hand-off of a PATCH body from the event loop to the worker thread that stores it:
bounded (the loop waits while the worker is behind), uncopied, and ended on every path.
"""

from __future__ import annotations

import asyncio

from phivault.devices.api import _BODY_AHEAD, _RequestBody

MIB = 1 << 20


def _drain(body: _RequestBody) -> int:
    total = 0
    while data := body.read(MIB):
        total += len(data)
    return total


def test_the_loop_stops_receiving_while_the_worker_is_behind() -> None:
    async def scenario() -> None:
        body = _RequestBody(asyncio.get_running_loop())
        piece = b"x" * MIB
        for _ in range(_BODY_AHEAD // MIB - 1):
            await asyncio.wait_for(body.put(piece), 1)  # room: returns at once
        full = asyncio.ensure_future(body.put(piece))
        await asyncio.sleep(0.05)
        assert not full.done()  # the limit is reached: the loop waits
        firsts = await asyncio.to_thread(lambda: [body.read(MIB) for _ in range(_BODY_AHEAD // MIB // 2)])
        assert all(first is piece for first in firsts)  # handed over uncopied
        await asyncio.wait_for(full, 5)  # the worker caught up half-way: room again
        body.end()
        assert await asyncio.to_thread(_drain, body) == _BODY_AHEAD - len(firsts) * MIB

    asyncio.run(scenario())


def test_a_read_smaller_than_a_piece_gets_it_in_parts_and_then_the_end() -> None:
    async def scenario() -> list[bytes]:
        body = _RequestBody(asyncio.get_running_loop())
        await body.put(b"abcdef")
        body.end()
        return await asyncio.to_thread(lambda: [body.read(4), body.read(4), body.read(4)])

    assert asyncio.run(scenario()) == [b"abcd", b"ef", b""]


def test_a_worker_waiting_for_more_sees_the_end_when_the_body_stops_short() -> None:
    async def scenario() -> int:
        body = _RequestBody(asyncio.get_running_loop())
        reading = asyncio.ensure_future(asyncio.to_thread(_drain, body))
        await body.put(b"y" * 1000)  # less than the wake-up threshold
        await asyncio.sleep(0.05)
        body.end()  # the client went away
        return await asyncio.wait_for(reading, 5)

    assert asyncio.run(scenario()) == 1000
