"""Request and response models of share links, PACS destinations and exports."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from phivault.exams.exports import DestinationInfo, DestinationSpec, ExportInfo, ExportItemInfo
from phivault.exams.shares import (
    MAX_PASSCODE,
    MIN_PASSCODE,
    CreatedShare,
    SharedInstance,
    ShareInfo,
    SharePage,
)

_EMAIL = r"^[^@\s]{1,64}@[^@\s]{1,189}$"


class ShareIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"expires_at": "2030-01-08T09:00:00Z", "mode": "view"}],
        },
    )

    expires_at: datetime = Field(description="required; at most PHIVAULT_SHARE_MAX_DAYS (7) days ahead")
    mode: Literal["view", "download"] = Field(
        default="view", description="view: page and previews; download: also the de-identified DICOM files"
    )
    passcode: Annotated[str, Field(min_length=MIN_PASSCODE, max_length=MAX_PASSCODE)] | None = Field(
        default=None, description="asked before anything is shown; give it to the recipient separately"
    )
    recipient_email: Annotated[str, Field(max_length=254, pattern=_EMAIL)] | None = Field(
        default=None,
        description="mail the link there (needs PHIVAULT_SMTP_HOST); the link is not returned then",
    )


class ShareOut(BaseModel):
    id: str
    exam_id: str
    mode: str
    expires_at: datetime
    created_at: datetime
    created_by: str
    has_passcode: bool
    recipient_email: str | None
    delivery: str = Field(description="link, queued, sent, failed, or not_configured (no SMTP server)")
    status: str = Field(description="active, pending (e-mail not sent yet), expired, revoked or blocked")
    access_count: int
    last_access_at: datetime | None
    instances: int

    @classmethod
    def of(cls, share: ShareInfo) -> ShareOut:
        return cls.model_validate(share, from_attributes=True)


class ShareCreatedOut(ShareOut):
    url: str | None = Field(description="the link: shown once, only when it is not e-mailed")
    notice: str | None = Field(
        default=None, description="what happened to the e-mail, when one was asked for"
    )

    @classmethod
    def of_created(cls, created: CreatedShare, url: str | None) -> ShareCreatedOut:
        notice = None
        if created.share.delivery.value == "not_configured":
            notice = (
                "no e-mail was sent: this phivault has no SMTP server (PHIVAULT_SMTP_HOST); "
                "give the link to the recipient yourself"
            )
        elif created.share.delivery.value == "queued":
            notice = "the link is being e-mailed to the recipient; follow delivery in the share list"
        return cls(**ShareOut.of(created.share).model_dump(), url=url, notice=notice)


class SharesOut(BaseModel):
    items: list[ShareOut]


class SharedInstanceOut(BaseModel):
    number: int
    modality: str
    series_number: int | None
    series_description: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    frames: int
    size: int
    rendered: str
    download: str | None

    @classmethod
    def of(cls, item: SharedInstance, base: str, *, download: bool) -> SharedInstanceOut:
        return cls(
            **{name: getattr(item, name) for name in SharedInstance.__dataclass_fields__},
            rendered=f"{base}/instances/{item.number}/rendered",
            download=f"{base}/instances/{item.number}" if download else None,
        )


class SharePageOut(BaseModel):
    """A share link's content as JSON (``Accept: application/json``): de-identified only."""

    mode: str
    expires_at: datetime
    study_description: str
    modalities: list[str]
    instances: list[SharedInstanceOut]

    @classmethod
    def of(cls, page: SharePage, base: str) -> SharePageOut:
        download = page.mode.value == "download"
        return cls(
            mode=page.mode.value,
            expires_at=page.expires_at,
            study_description=page.study_description,
            modalities=page.modalities,
            instances=[SharedInstanceOut.of(item, base, download=download) for item in page.instances],
        )


class DestinationIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "Radiology PACS",
                    "ae_title": "HOSP_PACS",
                    "host": "pacs.hospital.example",
                    "port": 104,
                    "calling_ae_title": "PHIVAULT",
                }
            ]
        },
    )

    name: Annotated[str, Field(min_length=1, max_length=100)]
    ae_title: Annotated[str, Field(min_length=1, max_length=16, description="the PACS's AE title (called)")]
    host: Annotated[str, Field(min_length=1, max_length=253)]
    port: Annotated[int, Field(ge=1, le=65535)]
    calling_ae_title: Annotated[
        str, Field(min_length=1, max_length=16, description="phivault's AE title as the PACS knows it")
    ] = "PHIVAULT"
    tls: bool = Field(default=False, description="DICOM TLS (PS3.15 B.1)")
    ca_pem: Annotated[str, Field(max_length=65536)] | None = Field(
        default=None, description="trust this CA (PEM) for the PACS's certificate instead of the system's"
    )

    def spec(self) -> DestinationSpec:
        return DestinationSpec(
            self.name, self.ae_title, self.host, self.port, self.calling_ae_title, self.tls, self.ca_pem
        )


class DestinationOut(BaseModel):
    id: str
    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    tls: bool
    ca_pem: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, info: DestinationInfo) -> DestinationOut:
        return cls.model_validate(info, from_attributes=True)


class DestinationsOut(BaseModel):
    items: list[DestinationOut]


class ExportIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"destination_id": "00000000-0000-4000-8000-000000000000"}]},
    )

    destination_id: Annotated[str, Field(min_length=1, max_length=64)]


class ExportItemOut(BaseModel):
    number: int
    instance_id: str
    status: str = Field(description="pending, sent (confirmed by the PACS) or failed")
    attempts: int
    dimse_status: int | None = Field(description="the PACS's last C-STORE response status")
    error: str | None
    sent_at: datetime | None

    @classmethod
    def of(cls, item: ExportItemInfo) -> ExportItemOut:
        return cls.model_validate(item, from_attributes=True)


class ExportOut(BaseModel):
    id: str
    exam_id: str
    destination_id: str
    requested_by: str
    status: str = Field(description="queued, running, retrying, completed or failed")
    attempts: int
    max_attempts: int
    reason: str | None = Field(description="why the last attempt failed")
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    sent: int
    total: int
    items: list[ExportItemOut]

    @classmethod
    def of(cls, info: ExportInfo) -> ExportOut:
        return cls(
            id=info.id,
            exam_id=info.exam_id,
            destination_id=info.destination_id,
            requested_by=info.requested_by,
            status=info.status.value,
            attempts=info.attempts,
            max_attempts=info.max_attempts,
            reason=info.reason,
            next_attempt_at=info.next_attempt_at,
            created_at=info.created_at,
            updated_at=info.updated_at,
            finished_at=info.finished_at,
            sent=info.sent,
            total=len(info.items),
            items=[ExportItemOut.of(item) for item in info.items],
        )


class ExportsOut(BaseModel):
    items: list[ExportOut]
