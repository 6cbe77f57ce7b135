"""Request and response bodies of the devices routes. Every request model carries an
example (the OpenAPI document shows it; the route-matrix test sends it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from phivault.devices.models import MAX_SERIAL
from phivault.devices.service import DeviceGrant, DeviceInfo, IssuedCode
from phivault.devices.uploads import UploadInfo, UploadReceipt

Serial = Annotated[str, Field(min_length=1, max_length=MAX_SERIAL, examples=["SN-0042"])]
Pin = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^sha256//[A-Za-z0-9+/]{43}=$")]


def _example(values: dict[str, JsonValue]) -> ConfigDict:
    return ConfigDict(extra="forbid", json_schema_extra={"examples": [values]})


class CodeCreateRequest(BaseModel):
    model_config = _example({"serial": "SN-0042"})
    serial: Serial | None = None


class CodeOut(BaseModel):
    code: str = Field(description="shown once; 25 characters of Crockford base32 (125 bits)")
    institution_id: str
    serial: str | None
    expires_at: datetime
    server_pins: list[str] = Field(description="the server certificate pins to give the device with the code")

    @classmethod
    def of(cls, issued: IssuedCode) -> CodeOut:
        return cls(
            code=issued.code,
            institution_id=issued.institution_id,
            serial=issued.serial,
            expires_at=issued.expires_at,
            server_pins=list(issued.server_pins),
        )


class DeviceOut(BaseModel):
    id: str
    institution_id: str
    serial: str | None
    key_thumbprint: str = Field(description="RFC 7638 SHA-256 thumbprint of the device's public key")
    activated_at: datetime
    last_seen_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, info: DeviceInfo) -> DeviceOut:
        return cls(
            id=info.id,
            institution_id=info.institution_id,
            serial=info.serial,
            key_thumbprint=info.key_thumbprint,
            activated_at=info.activated_at,
            last_seen_at=info.last_seen_at,
            revoked_at=info.revoked_at,
        )


class DevicesResponse(BaseModel):
    devices: list[DeviceOut]


class ActivateRequest(BaseModel):
    model_config = _example({"code": "7K3QD-M9XWT-4HFZC-PV2RA-8NJ6B", "tls_pin": "sha256//" + "A" * 43 + "="})
    code: str = Field(min_length=1, max_length=64)
    serial: Serial | None = None
    tls_pin: Pin | None = Field(default=None, description="the pin of the server certificate the device saw")


class DeviceTokenResponse(BaseModel):
    """RFC 6749 §5.1 field names; ``token_type`` DPoP (RFC 9449 §5)."""

    access_token: str
    token_type: Literal["DPoP"] = "DPoP"  # noqa: S105  # nosec B105  # a token type, not a secret
    expires_in: int
    device_id: str
    institution_id: str

    @classmethod
    def of(cls, grant: DeviceGrant) -> DeviceTokenResponse:
        return cls(
            access_token=grant.access_token,
            expires_in=grant.expires_in,
            device_id=grant.device_id,
            institution_id=grant.institution_id,
        )


class ReceiptOut(BaseModel):
    status: str = Field(description="stored, duplicate or quarantined")
    instance_id: str
    sha256: str = Field(description="SHA-256 of the bytes received: compare with what was sent")
    size: int
    sop_class_uid: str
    sop_instance_uid: str = Field(description="the de-identified SOP Instance UID phivault stores")
    series_instance_uid: str
    study_instance_uid: str
    study_id: str | None

    @classmethod
    def of(cls, receipt: UploadReceipt) -> ReceiptOut:
        return cls.model_validate(receipt.as_row())


class UploadOut(BaseModel):
    id: str
    length: int
    offset: int
    status: str
    created_at: datetime
    expires_at: datetime
    receipt: ReceiptOut | None

    @classmethod
    def of(cls, info: UploadInfo) -> UploadOut:
        return cls(
            id=info.id,
            length=info.length,
            offset=info.offset,
            status=info.status,
            created_at=info.created_at,
            expires_at=info.expires_at,
            receipt=ReceiptOut.of(info.receipt) if info.receipt is not None else None,
        )


class FinalizeRequest(BaseModel):
    model_config = _example({"sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"})
    sha256: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-fA-F]{64}$")
