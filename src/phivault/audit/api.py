"""Routes an outside auditor uses to check the log with any RFC 9162 implementation:
the latest signed checkpoint, the checkpoint keys, inclusion and consistency proofs.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from phivault.audit.checkpoint import verifier_key
from phivault.audit.errors import ProofError
from phivault.audit.schemas import ConsistencyProof, InclusionProof, PublicKey, PublicKeys
from phivault.http.deps import RuntimeDep
from phivault.http.problems import Problem

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

Size = Annotated[int, Query(ge=1, le=2**63 - 1)]
Index = Annotated[int, Query(ge=0, le=2**63 - 1)]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@router.get(
    "/checkpoint",
    response_class=PlainTextResponse,
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


@router.get("/public-keys", response_model=PublicKeys)
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


@router.get("/proofs/inclusion", response_model=InclusionProof)
def inclusion(runtime: RuntimeDep, index: Index, size: Size) -> InclusionProof:
    """Proof that leaf ``index`` is in the tree of ``size`` leaves (RFC 9162 §2.1.3)."""
    try:
        leaf, proof = runtime.audit.inclusion(index, size)
    except ProofError as exc:
        raise Problem(400, "invalid_proof_request", str(exc)) from None
    return InclusionProof(
        leaf_index=index, tree_size=size, leaf_hash=_b64(leaf), hashes=[_b64(h) for h in proof]
    )


@router.get("/proofs/consistency", response_model=ConsistencyProof)
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
