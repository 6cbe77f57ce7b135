"""Routes of devices: activation codes and device management (institution admins),
activation and tokens (devices, by proof), and resumable uploads (devices).

Uploads speak tus 1.0 (https://tus.io/protocols/resumable-upload): ``POST /api/v1/uploads``
(creation), ``HEAD`` for the offset, ``PATCH`` chunks with ``Upload-Checksum`` (checksum
extension, sha256), ``DELETE`` (termination), ``Upload-Expires`` (expiration); then
phivault's ``POST …/finalize`` with the SHA-256 of the whole hands the file to ingest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import threading
from collections import deque
from email.utils import format_datetime
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Path, Request, Response, status
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.devices.errors import (
    ChecksumRequired,
    ChunkLengthInvalid,
    InvalidInput,
    TusVersionUnsupported,
    UnsupportedMediaType,
)
from phivault.devices.schemas import (
    ActivateRequest,
    CodeCreateRequest,
    CodeOut,
    DeviceOut,
    DevicesResponse,
    DeviceTokenResponse,
    FinalizeRequest,
    ReceiptOut,
    UploadOut,
)
from phivault.devices.uploads import TUS_VERSION, UploadInfo, decode_checksum
from phivault.http.deps import DevicePrincipal, Public, RequestContextDep, RuntimeDep, proof_target, require

router = APIRouter(prefix="/api/v1", tags=["devices"])

DeviceId = Annotated[str, Path(min_length=1, max_length=64)]
UploadId = Annotated[str, Path(min_length=1, max_length=64)]
DeviceManager = Annotated[Principal, Depends(require(Permission.DEVICE_MANAGE))]
CHUNK_MEDIA_TYPE = "application/offset+octet-stream"
_READ_AHEAD = 1 << 20  # the worker is woken once this much of the body waits
_BODY_AHEAD = 8 << 20  # the loop stops receiving while this much waits for the worker
_MAX_HEADER_NUMBER = 20  # digits: more than any file


# -- management (institution admins) ---------------------------------------------------


@router.post("/devices/codes", response_model=CodeOut, status_code=status.HTTP_201_CREATED)
def create_code(
    body: CodeCreateRequest, principal: DeviceManager, runtime: RuntimeDep, context: RequestContextDep
) -> CodeOut:
    """A single-use activation code for a device of your institution (shown once)."""
    return CodeOut.of(runtime.devices.create_code(principal, principal.institution_id, body.serial, context))


@router.get("/devices", response_model=DevicesResponse)
def list_devices(principal: DeviceManager, runtime: RuntimeDep) -> DevicesResponse:
    """Your institution's devices, revoked ones included."""
    return DevicesResponse(devices=[DeviceOut.of(d) for d in runtime.devices.list_devices(principal)])


@router.get("/devices/{device_id}", response_model=DeviceOut)
def get_device(device_id: DeviceId, principal: DeviceManager, runtime: RuntimeDep) -> DeviceOut:
    return DeviceOut.of(runtime.devices.get_device(principal, device_id))


@router.post("/devices/{device_id}/revoke", response_model=DeviceOut)
def revoke_device(
    device_id: DeviceId, principal: DeviceManager, runtime: RuntimeDep, context: RequestContextDep
) -> DeviceOut:
    """Revoke a device: its next request is refused (401 `device_revoked`)."""
    return DeviceOut.of(runtime.devices.revoke(principal, device_id, context))


# -- activation and tokens (the proof is the credential) --------------------------------


@router.post("/devices/activate", response_model=DeviceTokenResponse, dependencies=[Public])
def activate(
    body: ActivateRequest, request: Request, runtime: RuntimeDep, context: RequestContextDep
) -> JSONResponse:
    """Activate a device with a code. Send a DPoP proof (RFC 9449) signed by the device's
    new key: its `jwk` header is the public key registered. Answers the first token.
    """
    grant = runtime.devices.activate(
        body.code,
        request.headers.getlist("dpop"),
        proof_target(request, runtime),
        serial=body.serial,
        tls_pin=body.tls_pin,
        context=context,
    )
    return _token_answer(DeviceTokenResponse.of(grant), grant.nonce)


@router.post("/devices/token", response_model=DeviceTokenResponse, dependencies=[Public])
def device_token(request: Request, runtime: RuntimeDep, context: RequestContextDep) -> JSONResponse:
    """A new access token for an activated device: send a DPoP proof signed by its key."""
    grant = runtime.devices.issue_token(
        request.headers.getlist("dpop"), proof_target(request, runtime), context
    )
    return _token_answer(DeviceTokenResponse.of(grant), grant.nonce)


def _token_answer(body: DeviceTokenResponse, nonce: str) -> JSONResponse:
    # RFC 6749 §5.1: token responses are not cached.
    return JSONResponse(
        body.model_dump(mode="json"),
        headers={"Cache-Control": "no-store", "DPoP-Nonce": nonce},
    )


# -- uploads (devices) ------------------------------------------------------------------


def _check_tus(version: str | None) -> None:
    if version != TUS_VERSION:
        raise TusVersionUnsupported


def _number(value: str | None, name: str) -> int:
    if value is None or not value.isascii() or not value.isdigit() or len(value) > _MAX_HEADER_NUMBER:
        raise InvalidInput(f"{name} must be a non-negative integer")
    return int(value)


def _client_ref(metadata: str | None) -> str | None:
    """The ``client-ref`` pair of tus Upload-Metadata; other pairs are ignored on purpose
    (a file name can be PHI, and none is needed).
    """
    for pair in (metadata or "").split(","):
        key, _, value = pair.strip().partition(" ")
        if key == "client-ref":
            try:
                return base64.b64decode(value.strip(), validate=True).decode("ascii")
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidInput("Upload-Metadata client-ref is base64 of ASCII") from None
    return None


def _tus_headers(request: Request, upload: UploadInfo) -> dict[str, str]:
    headers = {
        "Tus-Resumable": TUS_VERSION,
        "Upload-Offset": str(upload.offset),
        "Upload-Length": str(upload.length),
        "Upload-Expires": format_datetime(upload.expires_at, usegmt=True),
        "Cache-Control": "no-store",
    }
    nonce = getattr(request.state, "dpop_nonce", None)
    if nonce:
        headers["DPoP-Nonce"] = nonce
    return headers


@router.post(
    "/uploads",
    status_code=status.HTTP_201_CREATED,
    response_model=UploadOut,
    responses={200: {"description": "the unfinished upload with this client-ref already exists"}},
)
def create_upload(  # tus speaks in headers
    request: Request,
    principal: DevicePrincipal,
    runtime: RuntimeDep,
    context: RequestContextDep,
    upload_length: Annotated[str | None, Header(description="the file's size in bytes")] = None,
    upload_metadata: Annotated[str | None, Header(description="`client-ref <base64>` only")] = None,
    tus_resumable: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Tus creation: open an upload of `Upload-Length` bytes. Refused before any data is
    accepted if larger than an exam may be (413 `upload_too_large`) or over a storage quota
    (413 `quota_exceeded`, naming the quota).
    """
    _check_tus(tus_resumable)
    length = _number(upload_length, "Upload-Length")
    info, created = runtime.uploads.create(
        principal, length, client_ref=_client_ref(upload_metadata), context=context
    )
    headers = _tus_headers(request, info) | {"Location": f"/api/v1/uploads/{info.id}"}
    code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return JSONResponse(UploadOut.of(info).model_dump(mode="json"), status_code=code, headers=headers)


@router.head("/uploads/{upload_id}", status_code=status.HTTP_200_OK)
def upload_offset(
    upload_id: UploadId,
    request: Request,
    principal: DevicePrincipal,
    runtime: RuntimeDep,
    tus_resumable: Annotated[str | None, Header()] = None,
) -> Response:
    """tus: the server's offset, to resume from."""
    _check_tus(tus_resumable)
    info = runtime.uploads.get(principal, upload_id, resumable=True)
    return Response(status_code=status.HTTP_200_OK, headers=_tus_headers(request, info))


@router.get("/uploads/{upload_id}", response_model=UploadOut)
def get_upload(upload_id: UploadId, principal: DevicePrincipal, runtime: RuntimeDep) -> UploadOut:
    """The upload's state, with the receipt once finalized."""
    return UploadOut.of(runtime.uploads.get(principal, upload_id))


class _RequestBody:
    """The request body as a blocking ``read`` for the worker thread that stores the chunk,
    fed by a task on the event loop that keeps receiving meanwhile: the network and the
    encryption and disk write overlap.

    The pieces go over as the server received them (no copy on the loop, which is busy
    with TLS); the worker is woken once a megabyte is waiting rather than for every piece,
    and the loop stops receiving while ``_BODY_AHEAD`` bytes wait (so a slow disk holds
    back the client, not the server's memory). A plain lock and one future per wait cost
    far less than a memory stream per piece and a hop to the loop per read.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Condition()
        self._pieces: deque[bytes] = deque()
        self._queued = 0  # bytes in ``_pieces``
        self._ended = False
        self._space: asyncio.Future[None] | None = None  # the loop waits for room on it
        self._piece = b""
        self._position = 0  # of the next byte in ``_piece``

    # -- the event loop's side

    async def put(self, piece: bytes) -> None:
        with self._lock:
            self._pieces.append(piece)
            self._queued += len(piece)
            if self._queued >= _READ_AHEAD:
                self._lock.notify()
            if self._queued < _BODY_AHEAD:
                return
            space = self._space = self._loop.create_future()
        await space

    def end(self) -> None:
        """No more pieces (the body ended, the client went away, or the task was cancelled)."""
        with self._lock:
            self._ended = True
            self._lock.notify()

    # -- the worker thread's side

    def _take(self) -> bytes:
        with self._lock:
            while not self._pieces and not self._ended:
                self._lock.wait()
            if not self._pieces:
                return b""
            piece = self._pieces.popleft()
            self._queued -= len(piece)
            space = None
            if self._space is not None and self._queued <= _BODY_AHEAD // 2:
                space, self._space = self._space, None
        if space is not None:
            self._loop.call_soon_threadsafe(_make_room, space)
        return piece

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` bytes (fewer at the end of a piece); ``b""`` at the end."""
        if self._position >= len(self._piece):
            self._piece, self._position = self._take(), 0
        start, piece = self._position, self._piece
        if start == 0 and size >= len(piece):
            self._position = len(piece)
            return piece  # the whole piece, not copied
        self._position = min(start + size, len(piece))
        return piece[start : self._position]


def _make_room(space: asyncio.Future[None]) -> None:
    if not space.done():  # a cancelled request cancelled it
        space.set_result(None)


async def _pump(request: Request, body: _RequestBody) -> None:
    try:
        async for piece in request.stream():
            if piece:
                await body.put(piece)
    except ClientDisconnect:
        return  # the reader sees a short body: the chunk is refused and nothing kept
    finally:
        body.end()


@router.patch("/uploads/{upload_id}", status_code=status.HTTP_204_NO_CONTENT)
async def upload_chunk(  # tus speaks in headers
    upload_id: UploadId,
    request: Request,
    principal: DevicePrincipal,
    runtime: RuntimeDep,
    *,
    upload_offset: Annotated[str | None, Header()] = None,
    upload_checksum: Annotated[
        str | None, Header(description="`sha256 <base64 digest of the chunk>`")
    ] = None,
    tus_resumable: Annotated[str | None, Header()] = None,
) -> Response:
    """tus: append a chunk at `Upload-Offset` (the server's offset, else 409
    `upload_offset_mismatch`), sent as `application/offset+octet-stream` with a
    `Content-Length`. `Upload-Checksum: sha256 …` is required; a chunk that does not match
    it is dropped (460 `chunk_checksum_mismatch`).
    """
    _check_tus(tus_resumable)
    # Content-Type and Content-Length are HTTP's own headers, which OpenAPI does not describe
    # as parameters: read here rather than declared.
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != CHUNK_MEDIA_TYPE:
        raise UnsupportedMediaType
    offset = _number(upload_offset, "Upload-Offset")
    content_length = request.headers.get("content-length")
    if content_length is None:
        raise ChunkLengthInvalid
    length = _number(content_length, "Content-Length")
    try:
        checksum = decode_checksum(upload_checksum)
    except (ValueError, binascii.Error):
        raise InvalidInput("Upload-Checksum is `sha256 <base64 of 32 bytes>`") from None
    if checksum is None:
        raise ChecksumRequired
    body = _RequestBody(asyncio.get_running_loop())

    def store() -> UploadInfo:
        return runtime.uploads.append(
            principal, upload_id, offset=offset, length=length, checksum=checksum, body=body
        )

    outcome: UploadInfo | Exception
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_pump, request, body)
        try:
            outcome = await anyio.to_thread.run_sync(store)
        except Exception as exc:  # noqa: BLE001  # raised below, outside the task group
            outcome = exc
        tasks.cancel_scope.cancel()  # a refused chunk is not read to its end
    if isinstance(outcome, Exception):
        raise outcome
    return Response(status_code=status.HTTP_204_NO_CONTENT, headers=_tus_headers(request, outcome))


@router.post("/uploads/{upload_id}/finalize", response_model=ReceiptOut)
def finalize_upload(
    upload_id: UploadId,
    body: FinalizeRequest,
    principal: DevicePrincipal,
    runtime: RuntimeDep,
    context: RequestContextDep,
) -> ReceiptOut:
    """Check the SHA-256 of the whole file and ingest it; answers the receipt. Asking again
    answers the same (the receipt, or the same refusal).
    """
    return ReceiptOut.of(runtime.uploads.finalize(principal, upload_id, body.sha256, context))


@router.delete("/uploads/{upload_id}", status_code=status.HTTP_204_NO_CONTENT)
def cancel_upload(
    upload_id: UploadId,
    principal: DevicePrincipal,
    runtime: RuntimeDep,
    context: RequestContextDep,
    tus_resumable: Annotated[str | None, Header()] = None,
) -> Response:
    """Tus termination: cancel the upload; its chunks are shredded and deleted."""
    _check_tus(tus_resumable)
    runtime.uploads.cancel(principal, upload_id, context)
    return Response(status_code=status.HTTP_204_NO_CONTENT, headers={"Tus-Resumable": TUS_VERSION})
