"""Routes of the DICOM part: DICOMweb (``/dicomweb``, PS3.18) and DICOM node management.

STOW-RS reads the request body as a stream (no body parameter), so its routes are
``async``; the pipeline runs in worker threads, one part at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Path, Request, Response, status
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.audit.actions import ActorType
from phivault.audit.service import RequestContext
from phivault.dicom.errors import DicomNodeError
from phivault.dicom.multipart import MultipartError
from phivault.dicom.nodes import DicomNodes
from phivault.dicom.schemas import DicomNodeCreateRequest, DicomNodeOut, DicomNodesResponse
from phivault.dicom.stow import DICOM_JSON, StowError, StowLimits, StowService
from phivault.exams.types import IngestChannel, IngestOrigin
from phivault.http.deps import RequestContextDep, RuntimeDep, require
from phivault.http.problems import Problem
from phivault.runtime import Runtime

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
nodes_router = APIRouter(prefix="/api/v1/dicom", tags=["dicom"])

Uploader = Annotated[Principal, Depends(require(Permission.EXAM_CREATE))]
NodeManager = Annotated[Principal, Depends(require(Permission.DEVICE_MANAGE))]
StudyUid = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")]
ObjectId = Annotated[str, Path(min_length=1, max_length=64)]

_ACCEPTABLE: Final = frozenset({DICOM_JSON, "application/json", "application/*", "*/*"})
_DICOM_JSON_RESPONSE: dict[str, Any] = {
    "content": {DICOM_JSON: {"schema": {"type": "object", "description": "PS3.18 Annex F DICOM JSON"}}}
}
# The body is read as a stream, so FastAPI documents none. OpenAPI 3.1 can name a
# multipart/related body, but tools that generate requests from the document (schemathesis
# in tests/security) have no serializer for it and stop; an extension describes it instead.
_STOW_OPENAPI: Final[dict[str, Any]] = {
    "x-request-body": {
        "media-type": 'multipart/related; type="application/dicom"; boundary=…',
        "description": "one PS3.10 file per part (PS3.18 §10.5); see docs/dicom.md",
    }
}
_STOW_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {"description": "every instance was stored", **_DICOM_JSON_RESPONSE},
    202: {"description": "some instances were refused or quarantined", **_DICOM_JSON_RESPONSE},
    409: {"description": "no instance was stored", **_DICOM_JSON_RESPONSE},
}


# -- STOW-RS (PS3.18 §10.5) --------------------------------------------------------------


@router.post(
    "/studies",
    response_class=JSONResponse,
    responses=_STOW_RESPONSES,
    openapi_extra=_STOW_OPENAPI,
    summary="Store instances (STOW-RS)",
)
async def store_instances(
    request: Request, principal: Uploader, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    """Store DICOM instances: send `multipart/related; type="application/dicom"` with one PS3.10
    file per part; the answer is the Store Instances Response (PS3.18 §10.5.3, docs/dicom.md).
    """
    return await _store(request, principal, runtime, context, study=None)


@router.post(
    "/studies/{study}",
    response_class=JSONResponse,
    responses=_STOW_RESPONSES,
    openapi_extra=_STOW_OPENAPI,
    summary="Store instances of one study (STOW-RS)",
)
async def store_study_instances(
    study: StudyUid, request: Request, principal: Uploader, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    """Like `POST /dicomweb/studies`; an instance of another study is refused (`dicom_study_mismatch`)."""
    return await _store(request, principal, runtime, context, study=study)


async def _store(
    request: Request, principal: Principal, runtime: Runtime, context: RequestContext, *, study: str | None
) -> Response:
    _check_accept(request.headers.get("accept"))
    if principal.institution_id is None:  # exam:create is only held inside an institution
        raise Problem(403, "forbidden", "your role does not allow this")
    settings = runtime.settings
    origin = IngestOrigin(
        principal.institution_id,
        subject=principal,
        channel=IngestChannel.STOW,
        device_id=principal.actor.id if principal.actor.type is ActorType.DEVICE else None,
    )
    service = StowService(
        runtime.ingest,
        runtime.db,
        runtime.clock,
        StowLimits(settings.dicom_max_instance_bytes, settings.dicomweb_max_request_bytes),
        base_url=settings.public_url,
    )
    try:
        result = await service.store(
            request.stream(),
            content_type=request.headers.get("content-type"),
            content_length=_content_length(request.headers.get("content-length")),
            origin=origin,
            context=context,
            study=study,
        )
    except MultipartError as exc:
        raise Problem(exc.status, exc.code, exc.detail) from None
    except StowError as exc:
        problem = Problem(exc.status, exc.code, exc.detail)
        problem.extensions.update(exc.extensions)
        raise problem from None
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is listening any more
    return JSONResponse(result.body, status_code=result.status, media_type=DICOM_JSON)


def _check_accept(accept: str | None) -> None:
    """406 unless the client accepts ``application/dicom+json`` (PS3.18 §8.7.3: no XML here)."""
    if not accept:
        return
    offered = {item.split(";", 1)[0].strip().lower() for item in accept.split(",")}
    if not offered & _ACCEPTABLE:
        raise Problem(406, "not_acceptable", "the Store Instances Response is application/dicom+json")


def _content_length(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


# -- DICOM nodes (institution admins) -----------------------------------------------------


@contextmanager
def _node_problems() -> Iterator[None]:
    try:
        yield
    except DicomNodeError as exc:
        raise Problem(exc.status, exc.code, exc.detail) from None


def _nodes(runtime: Runtime) -> DicomNodes:
    return DicomNodes(runtime.db, runtime.clock)


@nodes_router.get("/nodes", response_model=DicomNodesResponse)
def list_nodes(principal: NodeManager, runtime: RuntimeDep) -> DicomNodesResponse:
    """The DICOM nodes (calling AE titles) of the admin's institution."""
    with _node_problems():
        nodes = _nodes(runtime).list(principal)
    return DicomNodesResponse(nodes=[DicomNodeOut.of(node) for node in nodes])


@nodes_router.post("/nodes", response_model=DicomNodeOut, status_code=status.HTTP_201_CREATED)
def add_node(
    body: DicomNodeCreateRequest, principal: NodeManager, runtime: RuntimeDep, context: RequestContextDep
) -> DicomNodeOut:
    """Allow a calling AE title to send to the C-STORE SCP for the admin's institution."""
    with _node_problems():
        node = _nodes(runtime).add(
            principal,
            ae_title=body.ae_title,
            device_id=body.device_id,
            description=body.description,
            context=context,
        )
    return DicomNodeOut.of(node)


@nodes_router.delete("/nodes/{node_id}", status_code=status.HTTP_204_NO_CONTENT)
def remove_node(
    node_id: ObjectId, principal: NodeManager, runtime: RuntimeDep, context: RequestContextDep
) -> None:
    """Remove a DICOM node: its AE title can no longer associate."""
    with _node_problems():
        _nodes(runtime).remove(principal, node_id, context)
