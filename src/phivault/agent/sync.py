"""Uploading the spool: each queued item through a resumable upload, with retries.

For each item: open an upload (or find the one opened before, also after a crash: its URL
is in the item's record, and the creation carries the item id as ``client-ref``), ask the
server's offset, send the rest in checksummed chunks, finalize with the SHA-256 of the
whole, and compare the receipt's digest with the local one. Only then is the local copy
deleted. Transient failures (network, 5xx, 429, a busy upload) are retried with
exponential back-off and full jitter; refusals that cannot change by retrying end the item
for this run (quota) or for good (the content was refused: kept, reported by ``status``).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Final

import httpx

from phivault.agent.client import ServerClient, ServerError
from phivault.agent.spool import Item, Spool, SpoolError, State

_JITTER: Final = random.SystemRandom()  # back-off jitter: not a secret, but the OS source costs nothing

DEFAULT_CHUNK: Final = 16 * 1024 * 1024
HELD_CHUNK: Final = 32 * 1024 * 1024  # held in memory while sent, two at a time: 64 MiB at most
_RESTART_CODES: Final = frozenset({"upload_digest_mismatch", "integrity_check_failed", "upload_expired"})
_WAIT_CODES: Final = frozenset({"upload_finalizing", "rate_limited", "database_unavailable"})
_FATAL_CODES: Final = frozenset({"device_revoked", "device_not_activated"})


def _retryable(error: ServerError) -> bool:
    """Whether trying again can succeed: the network, the server's load or state, a chunk
    damaged on the way (460), an upload to start over; not a refusal of the request itself.
    """
    if error.code in _RESTART_CODES or error.code in _WAIT_CODES:
        return True
    return error.status in (0, 401, 404, 408, 409, 410, 429, 460) or error.status >= 500  # noqa: PLR2004


@dataclass(frozen=True)
class _Chunk:
    checksum: bytes  # SHA-256 of the plaintext, for Upload-Checksum
    body: Callable[[], Iterable[bytes]]  # the plaintext, again for each try of the request


class _ItemDone(Exception):
    """This item's turn is over for this run (blocked by a quota, or refused for good)."""


@dataclass(frozen=True)
class SyncOptions:
    chunk_size: int = DEFAULT_CHUNK
    max_attempts: int = 8
    base_backoff: float = 1.0
    max_backoff: float = 60.0
    max_rate: float | None = None  # bytes per second, None: as fast as the link goes


@dataclass
class ItemResult:
    id: str
    state: str
    size: int
    sent_bytes: int = 0
    attempts: int = 0
    receipt_status: str | None = None
    error: str | None = None
    upload_seconds: float = 0.0  # sending chunks, in this run
    finalize_seconds: float = 0.0  # the server checking and ingesting the whole


@dataclass
class SyncReport:
    items: list[ItemResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def confirmed(self) -> int:
        return sum(1 for item in self.items if item.state == State.CONFIRMED)

    @property
    def unconfirmed(self) -> int:
        return sum(1 for item in self.items if item.state == State.QUEUED)

    def as_json(self) -> dict[str, Any]:
        sent = sum(item.sent_bytes for item in self.items)
        return {
            "confirmed": self.confirmed,
            "rejected": sum(1 for item in self.items if item.state == State.REJECTED),
            "unconfirmed": self.unconfirmed,
            "bytes_sent": sent,
            "seconds": round(self.seconds, 3),
            "items": [
                {
                    **vars(item),
                    "upload_seconds": round(item.upload_seconds, 3),
                    "finalize_seconds": round(item.finalize_seconds, 3),
                }
                for item in self.items
            ],
        }


class Progress:
    """What sync reports as it goes (the CLI draws a bar from it)."""

    def start(self, item: Item, offset: int) -> None: ...

    def advance(self, item: Item, sent: int) -> None: ...

    def finish(self, item: Item, result: ItemResult) -> None: ...


class _Throttle:
    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.began = time.monotonic()
        self.sent = 0

    def wait(self, size: int) -> None:
        if not self.rate:
            return
        self.sent += size
        ahead = self.sent / self.rate - (time.monotonic() - self.began)
        if ahead > 0:
            time.sleep(ahead)


class Syncer:
    def __init__(  # the parts a sync works with
        self,
        spool: Spool,
        client: ServerClient,
        options: SyncOptions,
        progress: Progress,
        *,
        now: Callable[[], datetime],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.spool = spool
        self.client = client
        self.options = options
        self.progress = progress
        self.now = now
        self.sleep = sleep
        self.throttle = _Throttle(options.max_rate)

    def run(self) -> SyncReport:
        began = time.monotonic()
        report = SyncReport()
        for item in list(self.spool.pending()):
            result = self.sync_item(item)
            report.items.append(result)
            self.progress.finish(item, result)
            if result.error and result.error.split(":", 1)[0] in _FATAL_CODES:
                break
        report.seconds = time.monotonic() - began
        return report

    def sync_item(self, item: Item) -> ItemResult:
        result = ItemResult(item.id, item.state, item.size)
        for attempt in range(1, self.options.max_attempts + 1):
            result.attempts = attempt
            item = item.but(attempts=item.attempts + 1)
            try:
                item = self._send(item, result)
            except _ItemDone:
                latest = self.spool.get(item.id)
                result.state = latest.state if latest is not None else result.state
                return result
            except ServerError as exc:
                result.error = f"{exc.code}: {exc.detail}" if exc.detail else exc.code
                item = self._after_refusal(item, exc)
                if exc.code in _FATAL_CODES or not _retryable(exc):
                    return result
                delay = self._delay(attempt, exc)
            except (httpx.TransportError, SpoolError, OSError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"
                item = item.but(last_error=result.error)
                self.spool.save(item)
                if isinstance(exc, SpoolError):
                    return result  # a damaged local copy does not heal by retrying
                delay = self._delay(attempt, None)
            else:
                result.state = item.state
                result.receipt_status = (item.receipt or {}).get("status")
                result.error = None
                return result
            if attempt < self.options.max_attempts:
                self.sleep(delay)
        return result

    def _delay(self, attempt: int, error: ServerError | None) -> float:
        if error is not None and "retry-after" in error.headers:
            try:
                return min(float(error.headers["retry-after"]), self.options.max_backoff)
            except ValueError:
                pass
        ceiling = min(self.options.max_backoff, self.options.base_backoff * 2 ** (attempt - 1))
        return _JITTER.uniform(0, ceiling)  # full jitter (AWS architecture blog), from the OS source

    def _after_refusal(self, item: Item, error: ServerError) -> Item:
        """Record a refusal; forget the upload when the server cannot continue it."""
        item = item.but(last_error=error.code)
        if error.code in _RESTART_CODES or error.status in (404, 410):
            item = item.but(upload_url=None)
        self.spool.save(item)
        return item

    def _send(self, item: Item, result: ItemResult) -> Item:
        if item.upload_url is None:
            try:
                url, offset = self.client.create_upload(item.size, client_ref=item.id)
            except ServerError as exc:
                if exc.code not in ("quota_exceeded", "upload_too_large"):
                    raise
                self.spool.save(item.but(last_error=exc.code))
                result.error = f"{exc.code}: {exc.detail}" if exc.detail else exc.code
                raise _ItemDone from None
            item = item.but(upload_url=url)
            self.spool.save(item)  # before any data: a restart finds this upload again
        else:
            url, offset = item.upload_url, self.client.offset(item.upload_url)
        self.progress.start(item, offset)
        began = time.monotonic()
        # The next chunk is read (and checksummed) while the current one travels.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checksum") as pool:
            ahead: dict[tuple[int, int], Future[_Chunk]] = {}
            while offset < item.size:
                length = min(self.options.chunk_size, item.size - offset)
                chunk = self._read_ahead(pool, ahead, item, offset, length).result()
                following = offset + length
                if following < item.size:
                    self._read_ahead(
                        pool, ahead, item, following, min(self.options.chunk_size, item.size - following)
                    )
                self.throttle.wait(length)
                try:
                    new_offset = self.client.send_chunk(url, offset, length, chunk.checksum, chunk.body)
                except ServerError as exc:
                    if exc.code != "upload_offset_mismatch":
                        raise
                    new_offset = int(exc.headers.get("upload-offset", offset))  # resume where it is
                result.sent_bytes += max(0, new_offset - offset)
                self.progress.advance(item, new_offset - offset)
                for stale in [key for key in ahead if key[0] != new_offset]:
                    del ahead[stale]  # a chunk is held only until it is sent (or not wanted)
                offset = new_offset
        result.upload_seconds += time.monotonic() - began
        began = time.monotonic()
        try:
            return self._finalize(item, url, result)
        finally:
            result.finalize_seconds += time.monotonic() - began

    def _read_ahead(
        self,
        pool: ThreadPoolExecutor,
        ahead: dict[tuple[int, int], Future[_Chunk]],
        item: Item,
        offset: int,
        length: int,
    ) -> Future[_Chunk]:
        if (offset, length) not in ahead:
            ahead[(offset, length)] = pool.submit(self._read_chunk, item, offset, length)
        return ahead[(offset, length)]

    def _read_chunk(self, item: Item, offset: int, length: int) -> _Chunk:
        """The chunk's checksum and, up to ``HELD_CHUNK`` bytes, its plaintext: decrypted
        once, hashed, then sent from memory. Larger chunks are decrypted again as they are
        sent, so memory does not grow with the chunk size.
        """
        digest = hashlib.sha256()
        held: list[bytes] | None = [] if length <= HELD_CHUNK else None
        for piece in self.spool.iter_range(item, offset, length):
            digest.update(piece)
            if held is not None:
                held.append(piece)
        if held is None:
            return _Chunk(digest.digest(), partial(self.spool.iter_range, item, offset, length))
        return _Chunk(digest.digest(), partial(iter, tuple(held)))

    def _finalize(self, item: Item, url: str, result: ItemResult) -> Item:
        try:
            receipt = self.client.finalize(url, item.sha256)
        except ServerError as exc:
            if exc.status == 422 and exc.code.startswith("dicom_"):  # noqa: PLR2004
                self.spool.save(item.but(state=State.REJECTED, rejected_code=exc.code, last_error=exc.code))
                result.error = exc.code
                raise _ItemDone from None
            if exc.code in ("quota_exceeded", "upload_too_large"):
                self.spool.save(item.but(last_error=exc.code))
                result.error = exc.code
                raise _ItemDone from None
            raise
        if receipt.get("sha256") != item.sha256 or receipt.get("size") != item.size:
            # The server stored other bytes than these: keep the copy, send it again.
            raise ServerError(0, "receipt_mismatch", "the server's receipt does not match the local digest")
        return self.spool.confirm(item, receipt, self.now())
