"""Routes of share links: the institution's side (``/api/v1/exams/{id}/shares``) and the
recipient's (``/share/{token}``, public). Thin: the logic is ``exams/shares.py``.

Everything a public route sends goes through the egress guard first (``egress.py``): a page
or an image is checked whole before it is answered; a DICOM file is checked chunk by chunk
as it streams, the first chunk before the answer starts. A hit answers 404 ``not_found``,
like a dead link (the recipient learns nothing); a hit further into a file cuts the
transfer before any byte of the value (the client sees it short of its Content-Length).
"""

from __future__ import annotations

import hashlib
import html
import itertools
from base64 import b64encode
from collections.abc import Iterator
from typing import Annotated, Final
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.audit.service import RequestContext
from phivault.dicom.accept import best_single, parse_accept
from phivault.dicom.render import JPEG, PNG, RenderOptions
from phivault.exams.egress import EgressBlocked
from phivault.exams.errors import NotFound
from phivault.exams.outbound_models import ShareMode
from phivault.exams.outbound_schemas import ShareCreatedOut, ShareIn, ShareOut, SharePageOut, SharesOut
from phivault.exams.shares import (
    NotDownloadable,
    OpenShare,
    PasscodeRequired,
    SharePage,
    ShareRequest,
    WrongPasscode,
)
from phivault.http.deps import Public, RequestContextDep, RuntimeDep, require
from phivault.http.problems import Problem
from phivault.runtime import Runtime

router = APIRouter(prefix="/api/v1/exams", tags=["share links"])
public_router = APIRouter(prefix="/share", tags=["share links"], dependencies=[Public])

Sharer = Annotated[Principal, Depends(require(Permission.EXAM_SHARE))]
ExamId = Annotated[str, Path(min_length=1, max_length=64)]
ShareId = Annotated[str, Path(min_length=1, max_length=64)]
Token = Annotated[str, Path(min_length=1, max_length=128)]
Number = Annotated[int, Path(ge=1, le=100_000)]
GRANT_COOKIE: Final = "phivault_share"
MAX_FORM_BYTES: Final = 1024
_STYLE: Final = (
    "body{font-family:sans-serif;margin:2em;max-width:60em}"
    "li{margin:1em 0;list-style:none}img{max-width:256px;max-height:256px;display:block}"
)
_STYLE_HASH: Final = b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
PAGE_CSP: Final = (
    f"default-src 'none'; img-src 'self'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_IMAGE_DOC: Final = {
    200: {
        "description": "the first frame",
        "content": {JPEG: {"schema": {"type": "string", "format": "binary"}}, PNG: {}},
    }
}
_PASSCODE_FORM: Final = {
    "description": "the link has a passcode: a form for browsers (JSON: problem `passcode_required`)",
    "content": {"text/html": {"schema": {"type": "string"}}},
}
_PAGE_DOC: Final = {
    200: {
        "description": "the shared exam",
        "content": {
            "text/html": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object", "description": "SharePageOut"}},
        },
    },
    401: _PASSCODE_FORM,
}
_PASSCODE_DOC: Final = {
    303: {"description": "the passcode is right: back to the link, with its cookie"},
    401: _PASSCODE_FORM,
}
_DICOM_DOC: Final = {
    200: {
        "description": "the de-identified instance (download links only)",
        "content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}}},
    }
}


# -- the institution's side ---------------------------------------------------------------------


@router.post(
    "/{exam_id}/shares",
    response_model=ShareCreatedOut,
    status_code=status.HTTP_201_CREATED,
    summary="Share an exam outside the institution (de-identified; a link, or an e-mail)",
)
def create_share(
    exam_id: ExamId, body: ShareIn, runtime: RuntimeDep, principal: Sharer, context: RequestContextDep
) -> ShareCreatedOut:
    request = ShareRequest(body.expires_at, ShareMode(body.mode), body.passcode, body.recipient_email)
    created = runtime.shares.create(principal, exam_id, request, context=context)
    url = runtime.shares.link(created.token) if created.token is not None else None
    return ShareCreatedOut.of_created(created, url)


@router.get("/{exam_id}/shares", response_model=SharesOut, summary="The share links of an exam")
def list_shares(
    exam_id: ExamId, runtime: RuntimeDep, principal: Sharer, context: RequestContextDep
) -> SharesOut:
    return SharesOut(
        items=[ShareOut.of(share) for share in runtime.shares.shares_of(principal, exam_id, context=context)]
    )


@router.delete("/{exam_id}/shares/{share_id}", response_model=ShareOut, summary="Revoke a share link")
def revoke_share(
    exam_id: ExamId, share_id: ShareId, runtime: RuntimeDep, principal: Sharer, context: RequestContextDep
) -> ShareOut:
    return ShareOut.of(runtime.shares.revoke(principal, exam_id, share_id, context=context))


# -- the recipient's side -----------------------------------------------------------------------


def _open(runtime: Runtime, request: Request, token: str, context: RequestContext) -> OpenShare:
    try:
        return runtime.shares.open(token, request.cookies.get(GRANT_COOKIE), context=context)
    except PasscodeRequired:
        raise Problem(401, "passcode_required", "open the link in a browser and enter its passcode") from None


def _wants_json(request: Request) -> bool:
    return best_single(parse_accept(request.headers.get("accept")), ("text/html", "application/json")) == (
        "application/json"
    )


@public_router.get(
    "/{token}",
    summary="A shared exam: its de-identified series and instances (HTML, or JSON when asked)",
    response_class=HTMLResponse,
    responses=_PAGE_DOC,  # type: ignore[arg-type]
)
def share_page(token: Token, request: Request, runtime: RuntimeDep, context: RequestContextDep) -> Response:
    try:
        opened = runtime.shares.open(token, request.cookies.get(GRANT_COOKIE), context=context)
    except PasscodeRequired:
        if _wants_json(request):
            raise Problem(401, "passcode_required", "POST the passcode to this URL first") from None
        return _html(_passcode_form(token, None), 401)
    page = runtime.shares.page(opened)
    base = f"/share/{token}"
    if _wants_json(request):
        body = SharePageOut.of(page, base).model_dump_json().encode()
        media_type = "application/json"
    else:
        body = _page_html(page, base).encode()
        media_type = "text/html; charset=utf-8"
    _screen_whole(runtime, opened, body, list(opened.items.values()), context)
    return Response(body, media_type=media_type, headers={"Content-Security-Policy": PAGE_CSP})


@public_router.post(
    "/{token}",
    summary="Enter a share link's passcode (form field `passcode`); sets a cookie for the link",
    response_class=HTMLResponse,
    status_code=303,
    responses=_PASSCODE_DOC,  # type: ignore[arg-type]
)
async def share_passcode(
    token: Token, request: Request, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Problem(413, "payload_too_large", f"the form has at most {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=5)
    except (UnicodeDecodeError, ValueError):
        raise Problem(400, "malformed_body", "send the form as application/x-www-form-urlencoded") from None
    passcode = (fields.get("passcode") or [""])[0]
    try:
        grant, seconds = await run_in_threadpool(
            runtime.shares.verify_passcode, token, passcode, context=context
        )
    except WrongPasscode:
        return _html(_passcode_form(token, "That passcode is not right."), 401)
    response = RedirectResponse(f"/share/{token}", status_code=303)
    response.set_cookie(
        GRANT_COOKIE,
        grant,
        max_age=seconds,
        path=f"/share/{token}",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response


@public_router.get(
    "/{token}/instances/{number}",
    summary="A shared instance as de-identified DICOM (download links only)",
    response_class=StreamingResponse,
    responses=_DICOM_DOC,  # type: ignore[arg-type]
)
def share_instance(
    token: Token, number: Number, request: Request, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    opened = _open(runtime, request, token, context)
    try:
        reading = runtime.shares.download(opened, number)
    except NotDownloadable:
        raise Problem(
            403, "share_view_only", "this link shows the exam; it does not give its files"
        ) from None
    guard = runtime.shares.guard(opened, [reading.instance.id])
    chunks = runtime.shares.screened(opened, guard, reading.iter_dicom(), context=context)
    try:
        first = next(chunks, b"")
    except EgressBlocked:
        raise NotFound from None
    headers = {
        "Content-Disposition": f'attachment; filename="instance-{number}.dcm"',
        "Content-Length": str(reading.instance.size),
    }
    return StreamingResponse(_chain(first, chunks), media_type="application/dicom", headers=headers)


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from itertools.chain([first], rest)


@public_router.get(
    "/{token}/instances/{number}/rendered",
    summary="A shared instance's first frame (or `frame`) as JPEG or PNG",
    response_class=Response,
    responses=_IMAGE_DOC,  # type: ignore[arg-type]
)
def share_rendered(  # path, query, request and dependencies
    token: Token,
    number: Number,
    request: Request,
    runtime: RuntimeDep,
    context: RequestContextDep,
    frame: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    media_type = best_single(parse_accept(request.headers.get("accept")), (JPEG, PNG))
    if media_type is None:
        raise Problem(406, "not_acceptable", "rendered images are image/jpeg or image/png")
    opened = _open(runtime, request, token, context)
    reading = runtime.shares.reading(opened, number)
    image = runtime.shares.rendered(reading, frame, RenderOptions(media_type=media_type))
    _screen_whole(runtime, opened, image, [reading.instance.id], context)
    return Response(image, media_type=media_type)


def _screen_whole(
    runtime: Runtime, opened: OpenShare, body: bytes, instance_ids: list[str], context: RequestContext
) -> None:
    guard = runtime.shares.guard(opened, instance_ids)
    if guard.finds(body):
        runtime.shares.alert(opened, context=context)
        raise NotFound


# -- HTML ---------------------------------------------------------------------------------------


def _html(text: str, status_code: int) -> HTMLResponse:
    return HTMLResponse(text, status_code=status_code, headers={"Content-Security-Policy": PAGE_CSP})


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex, nofollow">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )


def _passcode_form(token: str, message: str | None) -> str:
    note = f"<p>{html.escape(message)}</p>" if message else ""
    action = html.escape(f"/share/{token}")
    return _document(
        "Shared exam",
        f"<h1>Shared exam</h1><p>This link needs the passcode you were given.</p>{note}"
        f'<form method="post" action="{action}"><label>Passcode '
        '<input type="password" name="passcode" autocomplete="off" required></label> '
        '<button type="submit">Open</button></form>',
    )


def _page_html(page: SharePage, base: str) -> str:
    items = []
    for item in page.instances:
        series = f"Series {item.series_number}" if item.series_number is not None else "Series"
        label = " · ".join(
            part
            for part in (
                f"Image {item.number}",
                series,
                item.modality,
                item.series_description,
                f"{item.columns} x {item.rows}" if item.rows and item.columns else "",
                f"{item.frames} frames" if item.frames > 1 else "",
            )
            if part
        )
        link = html.escape(f"{base}/instances/{item.number}")
        download = f' <a href="{link}" download>Download DICOM</a>' if page.mode is ShareMode.DOWNLOAD else ""
        items.append(
            f'<li><img src="{link}/rendered" alt="Image {item.number}" loading="lazy">'
            f"{html.escape(label)}{download}</li>"
        )
    description = f"<p>{html.escape(page.study_description)}</p>" if page.study_description else ""
    modalities = html.escape(", ".join(page.modalities))
    return _document(
        "Shared exam",
        f"<h1>Shared exam</h1>{description}<p>{modalities} · {len(page.instances)} images · "
        f"available until {page.expires_at.strftime('%Y-%m-%d %H:%M')} UTC. "
        "Patient information has been removed.</p>"
        f"<ul>{''.join(items)}</ul>",
    )
