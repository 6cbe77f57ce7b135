"""WADO-RS routes (PS3.18 §10.4): instances, metadata, frames and rendered images.

Thin: negotiate the representation, ask ``runtime.reading`` (``exams/reading.py``) for the
instances, stream them. Principals with ``phi:read`` in the owning institution get
re-identified DICOM and metadata; everyone else the stored, de-identified instance. Frames
and rendered images are the same for both (no PHI lives in pixel data that passed ingest's
pixel rules). Every answer carries a strong ETag; ``If-None-Match`` answers 304.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom import uid as dicom_uid

from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.audit.actions import AuditAction
from phivault.audit.service import RequestContext
from phivault.dicom.accept import MULTIPART, MediaRange, best_single, parse_accept
from phivault.dicom.layout import FramesUnavailable, LayoutError
from phivault.dicom.render import (
    JPEG,
    MAX_VIEWPORT,
    PNG,
    RenderingUnavailable,
    RenderOptions,
    VoiFunction,
    Window,
    decode_frame,
    render,
)
from phivault.exams.egress import EgressBlocked
from phivault.exams.reading import InstanceReading, Retrieval
from phivault.http.deps import RequestContextDep, RuntimeDep, require
from phivault.http.problems import Problem
from phivault.ids import new_token
from phivault.runtime import Runtime

DICOM: Final = "application/dicom"
DICOM_JSON: Final = "application/dicom+json"
OCTET_STREAM: Final = "application/octet-stream"
UID_PATTERN: Final = r"^[0-9]+(\.[0-9]+)*$"
MAX_FRAMES_PER_REQUEST: Final = 1000
# The media type of one encapsulated frame (PS3.18 Table 8.7.3-2).
_FRAME_MEDIA_TYPES: Final[dict[str, str]] = {
    dicom_uid.JPEGBaseline8Bit: "image/jpeg",
    dicom_uid.JPEGExtended12Bit: "image/jpeg",
    dicom_uid.JPEGLossless: "image/jpeg",
    dicom_uid.JPEGLosslessSV1: "image/jpeg",
    dicom_uid.JPEGLSLossless: "image/jls",
    dicom_uid.JPEGLSNearLossless: "image/jls",
    dicom_uid.JPEG2000Lossless: "image/jp2",
    dicom_uid.JPEG2000: "image/jp2",
    dicom_uid.HTJ2KLossless: "image/jphc",
    dicom_uid.HTJ2KLosslessRPCL: "image/jphc",
    dicom_uid.HTJ2K: "image/jphc",
    dicom_uid.RLELossless: "image/dicom-rle",
}

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

Reader = Annotated[Principal, Depends(require(Permission.EXAM_READ))]
StudyUid = Annotated[str, Path(min_length=1, max_length=64, pattern=UID_PATTERN)]
SeriesUid = Annotated[str, Path(min_length=1, max_length=64, pattern=UID_PATTERN)]
InstanceUid = Annotated[str, Path(min_length=1, max_length=64, pattern=UID_PATTERN)]
FrameList = Annotated[
    str,
    Path(
        min_length=1,
        max_length=8000,
        pattern=r"^[0-9]{1,9}(,[0-9]{1,9})*$",
        description="e.g. `1` or `1,3,5`",
    ),
]
Quality = Annotated[int | None, Query(ge=1, le=100, description="JPEG quality")]
WindowParam = Annotated[
    str | None,
    Query(max_length=100, description="`center,width[,linear|linear-exact|sigmoid]` (PS3.18 §8.3.5.1.4)"),
]
Viewport = Annotated[str | None, Query(max_length=40, description="`width,height` to fit the image into")]

_MULTIPART_DOC: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": 'the instances, `multipart/related; type="application/dicom"`',
        "content": {MULTIPART: {"schema": {"type": "string", "format": "binary"}}},
    },
    304: {"description": "not modified (If-None-Match)"},
}
_METADATA_DOC: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": "the instances' attributes without bulk data, PS3.18 Annex F DICOM JSON",
        "content": {DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}},
    },
    304: {"description": "not modified (If-None-Match)"},
}
_RENDERED_DOC: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": "the frame as an image",
        "content": {JPEG: {"schema": {"type": "string", "format": "binary"}}, PNG: {}},
    },
    304: {"description": "not modified (If-None-Match)"},
}


# -- conditional requests (RFC 9110 §13.1.2) ------------------------------------------------


def _not_modified(request: Request, etag: str) -> Response | None:
    header = request.headers.get("if-none-match")
    if header is None:
        return None
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    if "*" in tags or etag in tags:
        return Response(status_code=304, headers={"ETag": etag})
    return None


# -- instances ------------------------------------------------------------------------------


def _dicom_choice(request: Request, syntaxes: Sequence[str], *, single: bool) -> str:
    """``multipart`` or ``single`` (an ``application/dicom`` body for one instance)."""
    for media_range in parse_accept(request.headers.get("accept")):
        syntax_ok = media_range.transfer_syntax in (None, "*") or all(
            media_range.transfer_syntax == syntax for syntax in syntaxes
        )
        if media_range.media_type == MULTIPART and media_range.accepts_part(DICOM) and syntax_ok:
            return "multipart"
        if media_range.media_type == "*/*":
            return "multipart"
        if single and media_range.media_type == DICOM and syntax_ok:
            return "single"
    raise Problem(
        406,
        "not_acceptable",
        'instances are served as multipart/related; type="application/dicom" in their stored syntax',
    )


def _multipart(parts: Iterator[tuple[str, Iterator[bytes]]], part_type: str, etag: str) -> StreamingResponse:
    boundary = "phivault-" + new_token()[:24]

    def body() -> Iterator[bytes]:
        for content_type, chunks in parts:
            yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
            yield from chunks
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(
        body(),
        media_type=f'{MULTIPART}; type="{part_type}"; boundary={boundary}',
        headers={"ETag": etag, "Vary": "Accept, Authorization"},
    )


def _dicom_parts(
    runtime: Runtime, retrieval: Retrieval, context: RequestContext
) -> Iterator[tuple[str, Iterator[bytes]]]:
    for reading in runtime.reading.readings(retrieval):
        yield (
            f"{DICOM}; transfer-syntax={reading.instance.transfer_syntax_uid}",
            _egress(runtime, retrieval, reading, context),
        )


def _egress(
    runtime: Runtime, retrieval: Retrieval, reading: InstanceReading, context: RequestContext
) -> Iterator[bytes]:
    """A de-identified instance goes through the egress guard (exams/egress.py): a hit cuts
    the transfer before any byte of the value and raises the alert; re-identified ones are
    PHI by design.
    """
    if reading.reidentified:
        return reading.iter_dicom()
    return runtime.shares.screened_download(
        retrieval.principal, retrieval.study, reading.instance.id, reading.iter_dicom(), context=context
    )


def _retrieve(
    request: Request,
    principal: Principal,
    runtime: Runtime,
    context: RequestContext,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> Response:
    retrieval = runtime.reading.retrieve(
        principal, study, series, instance, action=AuditAction.EXAM_DOWNLOAD, context=context
    )
    choice = _dicom_choice(
        request, [i.transfer_syntax_uid for i in retrieval.instances], single=instance is not None
    )
    etag = retrieval.etag("dicom")
    if (unchanged := _not_modified(request, etag)) is not None:
        return unchanged
    if choice == "single":
        reading = next(runtime.reading.readings(retrieval))
        headers = {"ETag": etag, "Vary": "Accept, Authorization"}
        if reading.size is not None:
            headers["Content-Length"] = str(reading.size)
        chunks = _egress(runtime, retrieval, reading, context)
        try:
            first = next(chunks, b"")
        except EgressBlocked:
            raise Problem(
                451, "egress_blocked", "this instance was withheld: see the security alert"
            ) from None
        return StreamingResponse(itertools.chain([first], chunks), media_type=DICOM, headers=headers)
    return _multipart(_dicom_parts(runtime, retrieval, context), DICOM, etag)


@router.get("/studies/{study}", summary="Retrieve a study (WADO-RS)", responses=_MULTIPART_DOC)
def retrieve_study(
    study: StudyUid, request: Request, principal: Reader, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    return _retrieve(request, principal, runtime, context, study)


@router.get(
    "/studies/{study}/series/{series}", summary="Retrieve a series (WADO-RS)", responses=_MULTIPART_DOC
)
def retrieve_series(
    study: StudyUid,
    series: SeriesUid,
    request: Request,
    principal: Reader,
    runtime: RuntimeDep,
    context: RequestContextDep,
) -> Response:
    return _retrieve(request, principal, runtime, context, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}",
    summary="Retrieve an instance (WADO-RS)",
    responses=_MULTIPART_DOC,
)
def retrieve_instance(
    study: StudyUid,
    series: SeriesUid,
    instance: InstanceUid,
    request: Request,
    principal: Reader,
    runtime: RuntimeDep,
    context: RequestContextDep,
) -> Response:
    return _retrieve(request, principal, runtime, context, study, series, instance)


# -- metadata -------------------------------------------------------------------------------


def _metadata(
    request: Request,
    principal: Principal,
    runtime: Runtime,
    context: RequestContext,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> Response:
    chosen = best_single(parse_accept(request.headers.get("accept")), (DICOM_JSON, "application/json"))
    if chosen is None:
        raise Problem(406, "not_acceptable", "metadata is served as application/dicom+json")
    retrieval = runtime.reading.retrieve(
        principal, study, series, instance, action=AuditAction.EXAM_VIEW, context=context
    )
    etag = retrieval.etag("metadata")
    if (unchanged := _not_modified(request, etag)) is not None:
        return unchanged
    answers = [reading.header().to_json_dict() for reading in runtime.reading.readings(retrieval)]
    return JSONResponse(answers, media_type=chosen, headers={"ETag": etag, "Vary": "Accept, Authorization"})


@router.get(
    "/studies/{study}/metadata", summary="Retrieve a study's metadata (WADO-RS)", responses=_METADATA_DOC
)
def study_metadata(
    study: StudyUid, request: Request, principal: Reader, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    return _metadata(request, principal, runtime, context, study)


@router.get(
    "/studies/{study}/series/{series}/metadata",
    summary="Retrieve a series' metadata (WADO-RS)",
    responses=_METADATA_DOC,
)
def series_metadata(
    study: StudyUid,
    series: SeriesUid,
    request: Request,
    principal: Reader,
    runtime: RuntimeDep,
    context: RequestContextDep,
) -> Response:
    return _metadata(request, principal, runtime, context, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="Retrieve an instance's metadata (WADO-RS)",
    responses=_METADATA_DOC,
)
def instance_metadata(
    study: StudyUid,
    series: SeriesUid,
    instance: InstanceUid,
    request: Request,
    principal: Reader,
    runtime: RuntimeDep,
    context: RequestContextDep,
) -> Response:
    return _metadata(request, principal, runtime, context, study, series, instance)


# -- frames and rendered images ---------------------------------------------------------------


def _frame_numbers(frames: str) -> list[int]:
    numbers = [int(part) for part in frames.split(",")]
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise Problem(400, "too_many_frames", f"at most {MAX_FRAMES_PER_REQUEST} frames per request")
    if any(number < 1 for number in numbers):
        raise Problem(400, "invalid_frame_number", "frame numbers start at 1")
    return numbers


def _one_instance(
    principal: Principal,
    runtime: Runtime,
    context: RequestContext,
    study: str,
    series: str,
    instance: str,
) -> InstanceReading:
    # Pixel data is the same for every reader: no PHI document is opened for it.
    return runtime.reading.open_instance(
        principal, study, series, instance, action=AuditAction.EXAM_VIEW, context=context, with_phi=False
    )


def _cut(reading: InstanceReading, numbers: list[int]) -> list[bytes]:
    try:
        return reading.frames(numbers)
    except IndexError:
        raise Problem(400, "frame_out_of_range", "the instance has fewer frames") from None
    except FramesUnavailable:
        raise Problem(
            406, "frames_unavailable", "single frames cannot be retrieved from this instance"
        ) from None
    except LayoutError:
        raise Problem(
            409, "integrity_check_failed", "the stored pixel data is not as its header says"
        ) from None


def _frame_media_type(request: Request, transfer_syntax: str) -> tuple[str, str]:
    """(part type, part Content-Type) for the frames of one transfer syntax, as accepted."""
    encapsulated = dicom_uid.UID(transfer_syntax).is_encapsulated
    media_type = _FRAME_MEDIA_TYPES.get(transfer_syntax) if encapsulated else OCTET_STREAM
    if media_type is None:
        raise Problem(406, "frames_unavailable", "single frames cannot be retrieved from this instance")
    syntax = transfer_syntax if encapsulated else dicom_uid.ExplicitVRLittleEndian
    for media_range in parse_accept(request.headers.get("accept")):
        if _accepts_frames(media_range, media_type, syntax):
            return media_type, f"{media_type}; transfer-syntax={syntax}"
    raise Problem(
        406,
        "not_acceptable",
        f'frames of this instance are served as multipart/related; type="{media_type}"',
    )


def _accepts_frames(media_range: MediaRange, media_type: str, syntax: str) -> bool:
    syntax_ok = media_range.transfer_syntax in (None, "*", syntax)
    if media_range.media_type == MULTIPART:
        return media_range.accepts_part(media_type) and syntax_ok
    return media_range.media_type == "*/*"


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="Retrieve frames (WADO-RS)",
    description="Decrypts only the requested frames' bytes (range reads), whatever the instance's size.",
    responses=_MULTIPART_DOC,
)
def retrieve_frames(  # noqa: PLR0913  # path, request and dependencies
    *,
    study: StudyUid,
    series: SeriesUid,
    instance: InstanceUid,
    frames: FrameList,
    request: Request,
    principal: Reader,
    runtime: RuntimeDep,
    context: RequestContextDep,
) -> Response:
    numbers = _frame_numbers(frames)
    reading = _one_instance(principal, runtime, context, study, series, instance)
    part_type, content_type = _frame_media_type(request, reading.instance.transfer_syntax_uid)
    etag = f'"f{reading.instance.sha256[:16]}{_digest(frames)}"'
    if (unchanged := _not_modified(request, etag)) is not None:
        return unchanged
    cut = _cut(reading, numbers)
    return _multipart(iter([(content_type, iter([frame])) for frame in cut]), part_type, etag)


def _render_options(
    request: Request, quality: int | None, window: str | None, viewport: str | None
) -> RenderOptions:
    media_type = best_single(parse_accept(request.headers.get("accept")), (JPEG, PNG))
    if media_type is None:
        raise Problem(406, "not_acceptable", "rendered images are image/jpeg or image/png")
    return RenderOptions(
        media_type=media_type,
        quality=quality or 90,
        window=_window(window),
        viewport=_viewport(viewport),
    )


def _window(text: str | None) -> Window | None:
    if not text:
        return None
    parts = text.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
        function = VoiFunction(parts[2].strip().lower()) if len(parts) > 2 else VoiFunction.LINEAR  # noqa: PLR2004
    except (IndexError, ValueError):
        raise Problem(400, "invalid_query_parameter", "window is center,width[,function]") from None
    if len(parts) > 3 or not width > 0 or not abs(center) < 1e12 or not width < 1e12:  # noqa: PLR2004
        raise Problem(400, "invalid_query_parameter", "window is center,width[,function] with width > 0")
    return Window(center, width, function)


def _viewport(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    match = re.fullmatch(r"(\d{1,5}),(\d{1,5})", text)
    if match is None:
        raise Problem(400, "invalid_query_parameter", "viewport is width,height")
    width, height = int(match[1]), int(match[2])
    if not (1 <= width <= MAX_VIEWPORT and 1 <= height <= MAX_VIEWPORT):
        raise Problem(400, "invalid_query_parameter", f"viewport sides are 1 to {MAX_VIEWPORT}")
    return width, height


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:15]


def _rendered(
    request: Request,
    principal: Principal,
    runtime: Runtime,
    context: RequestContext,
    path: tuple[str, str, str],
    frame: int,
    options: RenderOptions,
) -> Response:
    reading = _one_instance(principal, runtime, context, *path)
    etag = f'"i{reading.instance.sha256[:16]}{_digest(frame, options)}"'
    if (unchanged := _not_modified(request, etag)) is not None:
        return unchanged
    (data,) = _cut(reading, [frame])
    try:
        array = decode_frame(reading.layout.header, data, reading.instance.transfer_syntax_uid)
        image = render(reading.layout.header, array, options)
    except RenderingUnavailable:
        raise Problem(406, "rendering_unavailable", "this instance cannot be rendered as an image") from None
    return Response(
        image, media_type=options.media_type, headers={"ETag": etag, "Vary": "Accept, Authorization"}
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    summary="Retrieve a rendered instance (WADO-RS): its first frame as JPEG or PNG",
    responses=_RENDERED_DOC,
)
def rendered_instance(  # noqa: PLR0913  # path, options, request and dependencies
    *,
    study: StudyUid,
    series: SeriesUid,
    instance: InstanceUid,
    request: Request,
    principal: Reader,
    runtime: RuntimeDep,
    context: RequestContextDep,
    quality: Quality = None,
    window: WindowParam = None,
    viewport: Viewport = None,
) -> Response:
    options = _render_options(request, quality, window, viewport)
    return _rendered(request, principal, runtime, context, (study, series, instance), 1, options)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
    summary="Retrieve a rendered frame (WADO-RS) as JPEG or PNG",
    responses=_RENDERED_DOC,
)
def rendered_frame(  # noqa: PLR0913  # path, options, request and dependencies
    *,
    study: StudyUid,
    series: SeriesUid,
    instance: InstanceUid,
    frames: FrameList,
    request: Request,
    principal: Reader,
    runtime: RuntimeDep,
    context: RequestContextDep,
    quality: Quality = None,
    window: WindowParam = None,
    viewport: Viewport = None,
) -> Response:
    numbers = _frame_numbers(frames)
    if len(numbers) != 1:
        raise Problem(400, "invalid_frame_number", "one frame is rendered at a time")
    options = _render_options(request, quality, window, viewport)
    return _rendered(request, principal, runtime, context, (study, series, instance), numbers[0], options)
