"""Request and response bodies of the DICOM node routes.

The AE title is checked by the service, not here, so that an invalid one answers 400
``invalid_ae_title`` quoting PS3.5's rule; this model only caps the size of what it reads.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from phivault.dicom.nodes import NodeInfo


class DicomNodeCreateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"ae_title": "US_ROOM_3", "description": "ultrasound, room 3"}]},
    )
    ae_title: str = Field(max_length=64, description="the calling AE title (PS3.5: 1-16 characters)")
    device_id: str | None = Field(default=None, max_length=36, description="a device of the institution")
    description: str = Field(default="", max_length=200)


class DicomNodeOut(BaseModel):
    id: str
    institution_id: str
    ae_title: str
    device_id: str | None
    description: str
    created_at: datetime

    @classmethod
    def of(cls, info: NodeInfo) -> DicomNodeOut:
        return cls.model_validate(info, from_attributes=True)


class DicomNodesResponse(BaseModel):
    nodes: list[DicomNodeOut]
