"""Routes of export to PACS: destinations (``/api/v1/pacs-destinations``, ``pacs:manage``)
and exports of an exam (``/api/v1/exams/{id}/exports``, ``exam:export``). Thin: the logic
is ``exams/exports.py``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response, status

from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.exams.exports import DestinationInUse, ExportNotRetryable
from phivault.exams.outbound_schemas import (
    DestinationIn,
    DestinationOut,
    DestinationsOut,
    ExportIn,
    ExportOut,
    ExportsOut,
)
from phivault.http.deps import RequestContextDep, RuntimeDep, require
from phivault.http.problems import Problem

router = APIRouter(prefix="/api/v1/exams", tags=["export to PACS"])
destinations_router = APIRouter(prefix="/api/v1/pacs-destinations", tags=["export to PACS"])

Exporter = Annotated[Principal, Depends(require(Permission.EXAM_EXPORT))]
PacsAdmin = Annotated[Principal, Depends(require(Permission.PACS_MANAGE))]
ExamId = Annotated[str, Path(min_length=1, max_length=64)]
ExportId = Annotated[str, Path(min_length=1, max_length=64)]
DestinationId = Annotated[str, Path(min_length=1, max_length=64)]


@router.post(
    "/{exam_id}/exports",
    response_model=ExportOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Export an exam to a PACS, re-identified (queued; an export under way is returned)",
)
def create_export(
    exam_id: ExamId, body: ExportIn, runtime: RuntimeDep, principal: Exporter, context: RequestContextDep
) -> ExportOut:
    return ExportOut.of(runtime.exports.create(principal, exam_id, body.destination_id, context=context))


@router.get("/{exam_id}/exports", response_model=ExportsOut, summary="The exports of an exam, newest first")
def list_exports(
    exam_id: ExamId, runtime: RuntimeDep, principal: Exporter, context: RequestContextDep
) -> ExportsOut:
    return ExportsOut(
        items=[ExportOut.of(e) for e in runtime.exports.exports_of(principal, exam_id, context=context)]
    )


@router.get(
    "/{exam_id}/exports/{export_id}", response_model=ExportOut, summary="An export and each instance's status"
)
def get_export(
    exam_id: ExamId, export_id: ExportId, runtime: RuntimeDep, principal: Exporter, context: RequestContextDep
) -> ExportOut:
    return ExportOut.of(runtime.exports.get(principal, exam_id, export_id, context=context))


@router.post(
    "/{exam_id}/exports/{export_id}/retry",
    response_model=ExportOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Try a failed export again (only the instances the PACS has not confirmed)",
)
def retry_export(
    exam_id: ExamId, export_id: ExportId, runtime: RuntimeDep, principal: Exporter, context: RequestContextDep
) -> ExportOut:
    try:
        return ExportOut.of(runtime.exports.retry(principal, exam_id, export_id, context=context))
    except ExportNotRetryable:
        raise Problem(409, "export_not_failed", "only a failed export is tried again") from None


@destinations_router.get("", response_model=DestinationsOut, summary="The institution's PACS destinations")
def list_destinations(runtime: RuntimeDep, principal: PacsAdmin) -> DestinationsOut:
    return DestinationsOut(items=[DestinationOut.of(d) for d in runtime.pacs_destinations.all(principal)])


@destinations_router.post(
    "", response_model=DestinationOut, status_code=status.HTTP_201_CREATED, summary="Add a PACS destination"
)
def create_destination(
    body: DestinationIn, runtime: RuntimeDep, principal: PacsAdmin, context: RequestContextDep
) -> DestinationOut:
    return DestinationOut.of(runtime.pacs_destinations.create(principal, body.spec(), context=context))


@destinations_router.get("/{destination_id}", response_model=DestinationOut, summary="A PACS destination")
def get_destination(
    destination_id: DestinationId, runtime: RuntimeDep, principal: PacsAdmin
) -> DestinationOut:
    return DestinationOut.of(runtime.pacs_destinations.get(principal, destination_id))


@destinations_router.put(
    "/{destination_id}", response_model=DestinationOut, summary="Change a PACS destination"
)
def update_destination(
    destination_id: DestinationId,
    body: DestinationIn,
    runtime: RuntimeDep,
    principal: PacsAdmin,
    context: RequestContextDep,
) -> DestinationOut:
    return DestinationOut.of(
        runtime.pacs_destinations.update(principal, destination_id, body.spec(), context=context)
    )


@destinations_router.delete(
    "/{destination_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove a PACS destination and its export history (refused while an export runs)",
)
def delete_destination(
    destination_id: DestinationId, runtime: RuntimeDep, principal: PacsAdmin, context: RequestContextDep
) -> Response:
    try:
        runtime.pacs_destinations.delete(principal, destination_id, context=context)
    except DestinationInUse:
        raise Problem(409, "pacs_destination_in_use", "an export to this destination is under way") from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)
