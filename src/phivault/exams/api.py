"""Routes of the exam API (``/api/v1/exams``): list and detail, comments, archive, legal
hold and deletion. Thin: the logic is ``exams/service.py`` (``runtime.exams``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Response, status

from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.crypto.models import PurgeReason
from phivault.exams.errors import ExamProtected, NotCommentAuthor
from phivault.exams.schemas import CommentIn, CommentOut, CommentsOut, ExamDetailOut, ExamOut, ExamPageOut
from phivault.exams.service import MAX_PAGE, ExamFilter
from phivault.http.deps import RequestContextDep, RuntimeDep, require
from phivault.http.problems import Problem

router = APIRouter(prefix="/api/v1/exams", tags=["exams"])

Reader = Annotated[Principal, Depends(require(Permission.EXAM_READ))]
Commenter = Annotated[Principal, Depends(require(Permission.EXAM_COMMENT))]
Archiver = Annotated[Principal, Depends(require(Permission.EXAM_ARCHIVE))]
Holder = Annotated[Principal, Depends(require(Permission.EXAM_HOLD))]
Deleter = Annotated[Principal, Depends(require(Permission.EXAM_DELETE))]
ExamId = Annotated[str, Path(min_length=1, max_length=64)]
CommentId = Annotated[str, Path(min_length=1, max_length=64)]
DeletionReason = Literal["administrative", "erasure_request", "retention_expired"]


@router.get("", response_model=ExamPageOut, summary="List and search exams (archived ones hidden by default)")
def list_exams(  # noqa: PLR0913  # the filters are query parameters
    runtime: RuntimeDep,
    principal: Reader,
    context: RequestContextDep,
    *,
    archived: Annotated[bool, Query(description="include archived exams")] = False,
    modality: Annotated[str | None, Query(min_length=1, max_length=16)] = None,
    patient: Annotated[str | None, Query(min_length=1, max_length=64, description="a pseudonym")] = None,
    patient_id: Annotated[
        str | None, Query(min_length=1, max_length=64, description="the hospital's PatientID (phi:read)")
    ] = None,
    created_from: datetime | None = None,
    created_to: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> ExamPageOut:
    filters = ExamFilter(
        archived, modality, patient, patient_id, _utc(created_from), _utc(created_to), limit, offset
    )
    return ExamPageOut.of(runtime.exams.search(principal, filters, context=context))


def _utc(moment: datetime | None) -> datetime | None:
    """A time without an offset is read as UTC (ISO 8601 leaves it local; the server has none)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@router.get("/{exam_id}", response_model=ExamDetailOut, summary="An exam, its series and comment count")
def get_exam(
    exam_id: ExamId, runtime: RuntimeDep, principal: Reader, context: RequestContextDep
) -> ExamDetailOut:
    return ExamDetailOut.of_detail(runtime.exams.detail(principal, exam_id, context=context))


@router.post(
    "/{exam_id}/archive", response_model=ExamOut, summary="Archive an exam (hidden from default lists)"
)
def archive_exam(
    exam_id: ExamId, runtime: RuntimeDep, principal: Archiver, context: RequestContextDep
) -> ExamOut:
    return ExamOut.of(runtime.exams.set_archived(principal, exam_id, archived=True, context=context))


@router.delete("/{exam_id}/archive", response_model=ExamOut, summary="Unarchive an exam")
def unarchive_exam(
    exam_id: ExamId, runtime: RuntimeDep, principal: Archiver, context: RequestContextDep
) -> ExamOut:
    return ExamOut.of(runtime.exams.set_archived(principal, exam_id, archived=False, context=context))


@router.put("/{exam_id}/legal-hold", response_model=ExamOut, summary="Place a legal hold: no deletion")
def hold_exam(exam_id: ExamId, runtime: RuntimeDep, principal: Holder, context: RequestContextDep) -> ExamOut:
    return ExamOut.of(runtime.exams.set_legal_hold(principal, exam_id, held=True, context=context))


@router.delete("/{exam_id}/legal-hold", response_model=ExamOut, summary="Release a legal hold")
def release_exam(
    exam_id: ExamId, runtime: RuntimeDep, principal: Holder, context: RequestContextDep
) -> ExamOut:
    return ExamOut.of(runtime.exams.set_legal_hold(principal, exam_id, held=False, context=context))


@router.delete(
    "/{exam_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an exam: refused (409) under legal hold or within the retention period",
)
def delete_exam(
    exam_id: ExamId,
    runtime: RuntimeDep,
    principal: Deleter,
    context: RequestContextDep,
    reason: DeletionReason = "administrative",
) -> Response:
    try:
        runtime.exams.delete(principal, exam_id, reason=PurgeReason(reason), context=context)
    except ExamProtected as exc:
        raise Problem(409, exc.code, exc.detail) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{exam_id}/comments", response_model=CommentsOut, summary="An exam's comments, oldest first")
def list_comments(
    exam_id: ExamId, runtime: RuntimeDep, principal: Reader, context: RequestContextDep
) -> CommentsOut:
    comments = runtime.exams.comments(principal, exam_id, context=context)
    return CommentsOut(items=[CommentOut.of(comment) for comment in comments])


@router.post(
    "/{exam_id}/comments",
    response_model=CommentOut,
    status_code=status.HTTP_201_CREATED,
    summary="Comment on an exam",
)
def add_comment(
    exam_id: ExamId, body: CommentIn, runtime: RuntimeDep, principal: Commenter, context: RequestContextDep
) -> CommentOut:
    return CommentOut.of(runtime.exams.add_comment(principal, exam_id, body.body, context=context))


@router.patch("/{exam_id}/comments/{comment_id}", response_model=CommentOut, summary="Edit one's own comment")
def edit_comment(
    exam_id: ExamId,
    comment_id: CommentId,
    body: CommentIn,
    runtime: RuntimeDep,
    principal: Commenter,
    context: RequestContextDep,
) -> CommentOut:
    try:
        comment = runtime.exams.edit_comment(principal, exam_id, comment_id, body.body, context=context)
    except NotCommentAuthor:
        raise Problem(403, "not_comment_author", "only its author edits a comment") from None
    return CommentOut.of(comment)


@router.delete(
    "/{exam_id}/comments/{comment_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete one's own comment",
)
def delete_comment(
    exam_id: ExamId,
    comment_id: CommentId,
    runtime: RuntimeDep,
    principal: Commenter,
    context: RequestContextDep,
) -> Response:
    try:
        runtime.exams.delete_comment(principal, exam_id, comment_id, context=context)
    except NotCommentAuthor:
        raise Problem(403, "not_comment_author", "only its author deletes a comment") from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)
