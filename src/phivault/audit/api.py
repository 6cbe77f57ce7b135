"""Routes an outside auditor uses to check the log with any RFC 9162 implementation:
the latest signed checkpoint, the checkpoint keys, inclusion and consistency proofs.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse, StreamingResponse

from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.audit.checkpoint import verifier_key
from phivault.audit.errors import ProofError
from phivault.audit.export import MEDIA_TYPES, ExportFilter, ExportFormat, Observer, export_log, scoped
from phivault.audit.review import MAX_PAGE, InvalidReviewRequest, ReviewedEvent, review_events
from phivault.audit.schemas import (
    AuditEventOut,
    ConsistencyProof,
    EventActor,
    EventObject,
    EventPageOut,
    InclusionProof,
    PublicKey,
    PublicKeys,
)
from phivault.http.deps import Public, RequestContextDep, RuntimeDep, require
from phivault.http.problems import Problem

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

Size = Annotated[int, Query(ge=1, le=2**63 - 1)]
Index = Annotated[int, Query(ge=0, le=2**63 - 1)]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@router.get(
    "/checkpoint",
    response_class=PlainTextResponse,
    dependencies=[Public],
    responses={
        200: {"content": {"text/plain": {}}, "description": "the latest signed checkpoint (signed note)"}
    },
)
def latest_checkpoint(runtime: RuntimeDep) -> PlainTextResponse:
    """The latest checkpoint: origin, size, base64 root hash, then the Ed25519 signature line."""
    checkpoint = runtime.audit.latest_checkpoint()
    if checkpoint is None:
        raise Problem(404, "no_checkpoint", "the audit log has no checkpoint yet")
    return PlainTextResponse(checkpoint.note, media_type="text/plain; charset=utf-8")


@router.get("/public-keys", response_model=PublicKeys, dependencies=[Public])
def public_keys(runtime: RuntimeDep) -> PublicKeys:
    """Every key that has signed checkpoints of this log."""
    return PublicKeys(
        keys=[
            PublicKey(
                key_id=key_id,
                origin=origin,
                public_key=_b64(key.public_bytes_raw()),
                verifier_key=verifier_key(origin, key),
            )
            for key_id, origin, key in runtime.audit.public_keys()
        ]
    )


@router.get("/proofs/inclusion", response_model=InclusionProof, dependencies=[Public])
def inclusion(runtime: RuntimeDep, index: Index, size: Size) -> InclusionProof:
    """Proof that leaf ``index`` is in the tree of ``size`` leaves (RFC 9162 §2.1.3)."""
    try:
        leaf, proof = runtime.audit.inclusion(index, size)
    except ProofError as exc:
        raise Problem(400, "invalid_proof_request", str(exc)) from None
    return InclusionProof(
        leaf_index=index, tree_size=size, leaf_hash=_b64(leaf), hashes=[_b64(h) for h in proof]
    )


@router.get("/proofs/consistency", response_model=ConsistencyProof, dependencies=[Public])
def consistency(
    runtime: RuntimeDep,
    first: Annotated[int, Query(alias="from", ge=1, le=2**63 - 1)],
    second: Annotated[int, Query(alias="to", ge=1, le=2**63 - 1)],
) -> ConsistencyProof:
    """Proof that the tree of ``from`` leaves is a prefix of the tree of ``to`` (RFC 9162 §2.1.4)."""
    try:
        proof = runtime.audit.consistency(first, second)
    except ProofError as exc:
        raise Problem(400, "invalid_proof_request", str(exc)) from None
    return ConsistencyProof(first=first, second=second, hashes=[_b64(h) for h in proof])


ExportPrincipal = Annotated[Principal, Depends(require(Permission.AUDIT_EXPORT))]
_EXTENSIONS = {ExportFormat.JSONL: "jsonl", ExportFormat.FHIR: "fhir.json", ExportFormat.SYSLOG: "log"}


def _as_utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)  # a time without an offset is read as UTC


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {media_type: {} for media_type in MEDIA_TYPES.values()},
            "description": "integrated records in leaf order: JSON Lines, FHIR R4 Bundle or RFC 5424 lines",
        }
    },
)
def export(  # noqa: PLR0913, PLR0917  # one query parameter per filter
    runtime: RuntimeDep,
    principal: ExportPrincipal,
    context: RequestContextDep,
    export_format: Annotated[ExportFormat, Query(alias="format")] = ExportFormat.JSONL,
    since: Annotated[datetime | None, Query(description="inclusive; UTC when no offset")] = None,
    until: Annotated[datetime | None, Query(description="exclusive; UTC when no offset")] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    actor: Annotated[str | None, Query(max_length=64)] = None,
) -> StreamingResponse:
    """Export the log of the caller's institution (operators: the platform's records only).

    The export is itself audited (``audit.export``) before the first byte is sent.
    """
    filters = scoped(
        principal, ExportFilter(since=_as_utc(since), until=_as_utc(until), action=action, actor_id=actor)
    )
    chunks = export_log(
        runtime.db,
        export_format,
        filters,
        principal,
        Observer.local(runtime.settings.audit_origin),
        now=runtime.clock.now(),
        context=context,
    )
    filename = f"audit.{_EXTENSIONS[export_format]}"
    return StreamingResponse(
        chunks,
        media_type=MEDIA_TYPES[export_format],
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


ReviewPrincipal = Annotated[Principal, Depends(require(Permission.AUDIT_READ))]
Filter = Annotated[str | None, Query(max_length=128)]


@router.get("/events", response_model=EventPageOut)
def events(  # noqa: PLR0913, PLR0917  # one query parameter per filter
    runtime: RuntimeDep,
    principal: ReviewPrincipal,
    context: RequestContextDep,
    actor: Filter = None,
    action: Filter = None,
    object_type: Filter = None,
    object_id: Filter = None,
    outcome: Filter = None,
    since: Annotated[datetime | None, Query(description="inclusive; UTC when no offset")] = None,
    until: Annotated[datetime | None, Query(description="exclusive; UTC when no offset")] = None,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> EventPageOut:
    """The log of the caller's institution, newest first (operators: platform records only).

    Each page read is itself recorded as ``audit.read``.
    """
    filters = ExportFilter(
        since=_as_utc(since),
        until=_as_utc(until),
        action=action,
        actor_id=actor,
        object_type=object_type,
        object_id=object_id,
        outcome=outcome,
    )
    try:
        page = review_events(
            runtime.db,
            principal,
            filters,
            cursor=cursor,
            limit=limit,
            now=runtime.clock.now(),
            context=context,
        )
    except InvalidReviewRequest as exc:
        raise Problem(400, "invalid_filter", str(exc)) from None
    return EventPageOut(
        events=[_event_out(event) for event in page.events],
        next_cursor=page.next_cursor,
    )


def _event_out(event: ReviewedEvent) -> AuditEventOut:
    fields = event.fields
    return AuditEventOut(
        id=fields.id,
        ts=fields.ts,
        actor=EventActor(type=fields.actor_type, id=fields.actor_id),
        institution_id=fields.institution_id,
        action=fields.action,
        object=None
        if fields.object_type is None
        else EventObject(type=fields.object_type, id=fields.object_id),
        outcome=fields.outcome,
        ip=fields.ip,
        user_agent=fields.user_agent,
        request_id=fields.request_id,
        leaf_index=event.leaf_index,
    )
