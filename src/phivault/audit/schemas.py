"""Response models of the audit routes. Hashes are standard base64, as in checkpoints."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class PublicKey(BaseModel):
    key_id: str
    origin: str = Field(description="the log's name, first line of every checkpoint")
    algorithm: str = "Ed25519"
    public_key: str = Field(description="the raw 32-byte Ed25519 public key, base64")
    verifier_key: str = Field(description="signed-note verifier key string (golang.org/x/mod/sumdb/note)")


class PublicKeys(BaseModel):
    keys: list[PublicKey]


class InclusionProof(BaseModel):
    leaf_index: int
    tree_size: int
    leaf_hash: str
    hashes: list[str] = Field(description="RFC 9162 §2.1.3 inclusion path, base64, leaf to root")


class ConsistencyProof(BaseModel):
    first: int = Field(alias="from")
    second: int = Field(alias="to")
    hashes: list[str] = Field(description="RFC 9162 §2.1.4 consistency proof, base64")

    model_config = {"populate_by_name": True, "serialize_by_alias": True}


class EventActor(BaseModel):
    type: str
    id: str


class EventObject(BaseModel):
    type: str
    id: str | None


class AuditEventOut(BaseModel):
    id: str
    ts: datetime
    actor: EventActor
    institution_id: str | None
    action: str
    object: EventObject | None
    outcome: str
    ip: str | None
    user_agent: str | None
    request_id: str | None
    leaf_index: int | None = Field(description="position in the Merkle tree; null until integrated")


class EventPageOut(BaseModel):
    events: list[AuditEventOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null at the end")
