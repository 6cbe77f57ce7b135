"""Routes of ingest administration: an institution's ingest policy, device quotas and the
quarantine of instances with burned-in text (institution admins).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.exams.models import QuarantineStatus
from phivault.exams.policy import PixelRuleModel, PolicyModel
from phivault.exams.quarantine import MAX_PAGE, QuarantineEntry
from phivault.exams.types import Receipt
from phivault.http.deps import RequestContextDep, RuntimeDep, require

router = APIRouter(prefix="/api/v1", tags=["ingest"])

ObjectId = Annotated[str, Path(min_length=1, max_length=64)]
Configurer = Annotated[Principal, Depends(require(Permission.INSTITUTION_CONFIGURE))]
DeviceManager = Annotated[Principal, Depends(require(Permission.DEVICE_MANAGE))]


class DeviceQuotaIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"quota_bytes": 5368709120}]})

    quota_bytes: int | None = Field(ge=0, description="Bytes; 0: no limit; null: the institution's default.")


class QuarantineEntryOut(BaseModel):
    """A quarantined instance: what choosing a pixel rule needs, never PHI."""

    id: str
    status: QuarantineStatus
    reason: str
    sop_class_uid: str
    modality: str
    manufacturer: str
    model_name: str
    rows: int | None
    columns: int | None
    transfer_syntax_uid: str
    received_size: int
    channel: str
    device_id: str | None
    created_at: datetime
    resolved_at: datetime | None
    instance_id: str | None

    @classmethod
    def of(cls, entry: QuarantineEntry) -> QuarantineEntryOut:
        return cls.model_validate(entry, from_attributes=True)


class QuarantinePageOut(BaseModel):
    items: list[QuarantineEntryOut]
    next_before: datetime | None = Field(description="Pass as `before` for the next page; null at the end.")


class ReleaseIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "rule": {
                        "manufacturer": "Acme Sonics",
                        "regions": [{"x": 0, "y": 0, "width": 640, "height": 48}],
                    }
                }
            ]
        },
    )

    rule: PixelRuleModel | None = Field(
        default=None, description="Tried before the institution's rules; null: the current rules only."
    )


class ReceiptOut(BaseModel):
    """What the sender of an instance gets back (de-identified UIDs, digest of the bytes)."""

    status: str
    instance_id: str
    sha256: str
    size: int
    sop_class_uid: str
    received_sop_instance_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    study_id: str | None

    @classmethod
    def of(cls, receipt: Receipt) -> ReceiptOut:
        return cls.model_validate(receipt, from_attributes=True)


@router.get("/ingest/policy", response_model=PolicyModel)
def get_policy(runtime: RuntimeDep, principal: Configurer) -> PolicyModel:
    """The institution's de-identification options, private-tag allow-list, pixel rules, quotas."""
    return runtime.ingest.policies.get(principal)


@router.put("/ingest/policy", response_model=PolicyModel)
def put_policy(
    runtime: RuntimeDep, principal: Configurer, body: PolicyModel, context: RequestContextDep
) -> PolicyModel:
    """Replace the policy; it applies to instances received from now on."""
    return runtime.ingest.policies.update(principal, body, context=context)


@router.put("/ingest/devices/{device_id}/quota", status_code=status.HTTP_204_NO_CONTENT)
def put_device_quota(
    runtime: RuntimeDep,
    principal: DeviceManager,
    device_id: ObjectId,
    body: DeviceQuotaIn,
    context: RequestContextDep,
) -> Response:
    """Give one device its own storage quota, or (null) the institution's default again."""
    runtime.ingest.policies.set_device_quota(principal, device_id, body.quota_bytes, context=context)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/quarantine", response_model=QuarantinePageOut)
def list_quarantine(
    runtime: RuntimeDep,
    principal: Configurer,
    context: RequestContextDep,
    status_filter: Annotated[QuarantineStatus | None, Query(alias="status")] = QuarantineStatus.PENDING,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    before: datetime | None = None,
) -> QuarantinePageOut:
    """Quarantined instances of the institution, newest first (default: pending ones)."""
    entries = runtime.quarantine.list(
        principal, status=status_filter, limit=limit, before=before, context=context
    )
    return QuarantinePageOut(
        items=[QuarantineEntryOut.of(e) for e in entries],
        next_before=entries[-1].created_at if len(entries) == limit else None,
    )


@router.get("/quarantine/{quarantine_id}", response_model=QuarantineEntryOut)
def get_quarantined(
    runtime: RuntimeDep, principal: Configurer, quarantine_id: ObjectId
) -> QuarantineEntryOut:
    return QuarantineEntryOut.of(runtime.quarantine.get(principal, quarantine_id))


@router.post("/quarantine/{quarantine_id}/release", response_model=ReceiptOut)
def release_quarantined(
    runtime: RuntimeDep,
    principal: Configurer,
    quarantine_id: ObjectId,
    body: ReleaseIn,
    context: RequestContextDep,
) -> ReceiptOut:
    """Blank the regions of ``rule`` (or of the institution's rules) and store the instance.

    400 ``pixel_rule_not_applicable`` if the instance would still need quarantine.
    """
    rule = body.rule.to_rule() if body.rule is not None else None
    return ReceiptOut.of(runtime.quarantine.release(principal, quarantine_id, rule, context=context))


@router.post("/quarantine/{quarantine_id}/reject", status_code=status.HTTP_204_NO_CONTENT)
def reject_quarantined(
    runtime: RuntimeDep, principal: Configurer, quarantine_id: ObjectId, context: RequestContextDep
) -> Response:
    """Refuse the instance for good; its bytes are deleted."""
    runtime.quarantine.reject(principal, quarantine_id, context=context)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
