"""Devices for tests: keys that sign DPoP proofs (RFC 9449), activation through the API,
and a client that sends device requests the way the agent does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from factories.accounts import CLI
from phivault.runtime import Runtime
from servers import logscan

BASE = "https://testserver"
TUS = {"Tus-Resumable": "1.0.0"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def chunk_checksum(data: bytes) -> str:
    return "sha256 " + base64.b64encode(hashlib.sha256(data).digest()).decode()


@dataclass
class DeviceKey:
    """A device's key pair; ``proof`` signs a DPoP proof for one request."""

    algorithm: str = "EdDSA"
    private: Any = None
    clock: Callable[[], float] = time.time
    jti_counter: int = 0

    def __post_init__(self) -> None:
        if self.private is None:
            self.private = (
                Ed25519PrivateKey.generate()
                if self.algorithm == "EdDSA"
                else ec.generate_private_key(ec.SECP256R1())
            )

    @property
    def jwk(self) -> dict[str, Any]:
        jwk_json = jwt.algorithms.get_default_algorithms()[self.algorithm].to_jwk(self.private.public_key())
        public: dict[str, Any] = json.loads(jwk_json)
        return {name: public[name] for name in ("kty", "crv", "x", "y") if name in public}

    @property
    def thumbprint(self) -> str:
        jwk = self.jwk
        members = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("crv", "kty", "x")
        canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
        return b64url(hashlib.sha256(canonical.encode()).digest())

    def proof(  # noqa: PLR0913  # every claim a test may bend
        self,
        method: str,
        url: str,
        *,
        token: str | None = None,
        nonce: str | None = None,
        iat: float | None = None,
        jti: str | None = None,
        typ: str = "dpop+jwt",
        extra_headers: Mapping[str, Any] | None = None,
    ) -> str:
        self.jti_counter += 1
        claims: dict[str, Any] = {
            "jti": jti or f"{time.monotonic_ns()}-{self.jti_counter}",
            "htm": method,
            "htu": url,
            "iat": int(iat if iat is not None else self.clock()),
        }
        if token is not None:
            claims["ath"] = b64url(hashlib.sha256(token.encode()).digest())
        if nonce is not None:
            claims["nonce"] = nonce
        headers: dict[str, Any] = {"typ": typ, "jwk": self.jwk, **(extra_headers or {})}
        return jwt.encode(claims, self.private, algorithm=self.algorithm, headers=headers)


@dataclass
class DeviceSession:
    """An activated device talking to phivault: keeps its token and the latest nonce,
    retries once on ``use_dpop_nonce`` like the agent does.
    """

    client: Any
    key: DeviceKey
    base: str = BASE
    token: str | None = None
    nonce: str | None = None
    device_id: str | None = None
    institution_id: str | None = None
    history: list[Any] = field(default_factory=list)

    def send(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        json_body: Any = None,  # noqa: ANN401
        content: bytes | None = None,
        with_token: bool = True,
        retry_nonce: bool = True,
    ) -> Any:  # noqa: ANN401
        url = self.base + path
        for _ in range(2):
            sent = dict(headers or {})
            token = self.token if with_token else None
            sent["DPoP"] = self.key.proof(method, url, token=token, nonce=self.nonce)
            if token is not None:
                sent["Authorization"] = f"DPoP {token}"
            kwargs: dict[str, Any] = {"headers": sent}
            if json_body is not None:
                kwargs["json"] = json_body
            if content is not None:
                kwargs["content"] = content
            response = self.client.request(method, path, **kwargs)
            self.history.append(response)
            if "dpop-nonce" in response.headers:
                self.nonce = response.headers["dpop-nonce"]
            if (
                retry_nonce
                and response.status_code == 401
                and response.headers.get("content-type") == "application/problem+json"
                and response.json().get("code") == "use_dpop_nonce"
            ):
                continue
            return response
        return response

    def activate(self, code: str, **body: Any) -> Any:  # noqa: ANN401
        response = self.send(
            "POST", "/api/v1/devices/activate", json_body={"code": code, **body}, with_token=False
        )
        if response.status_code == 200:
            answer = response.json()
            self.token = answer["access_token"]
            logscan.plant(answer["access_token"])
            self.device_id = answer["device_id"]
            self.institution_id = answer["institution_id"]
        return response

    def refresh_token(self) -> Any:  # noqa: ANN401
        response = self.send("POST", "/api/v1/devices/token", with_token=False)
        if response.status_code == 200:
            self.token = response.json()["access_token"]
            logscan.plant(self.token)
        return response

    def create_upload(self, length: int, client_ref: str | None = None) -> Any:  # noqa: ANN401
        headers = {**TUS, "Upload-Length": str(length)}
        if client_ref is not None:
            headers["Upload-Metadata"] = "client-ref " + base64.b64encode(client_ref.encode()).decode()
        return self.send("POST", "/api/v1/uploads", headers=headers)

    def patch(self, upload_id: str, offset: int, data: bytes, checksum: str | None = None) -> Any:  # noqa: ANN401
        headers = {
            **TUS,
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": str(offset),
            "Upload-Checksum": checksum or chunk_checksum(data),
        }
        return self.send("PATCH", f"/api/v1/uploads/{upload_id}", headers=headers, content=data)

    def finalize(self, upload_id: str, sha256: str) -> Any:  # noqa: ANN401
        return self.send("POST", f"/api/v1/uploads/{upload_id}/finalize", json_body={"sha256": sha256})

    def upload(self, data: bytes, chunk: int = 256 * 1024) -> Any:  # noqa: ANN401
        """Create, send every chunk, finalize; returns the finalize response."""
        created = self.create_upload(len(data))
        assert created.status_code == 201, created.text
        upload_id = created.json()["id"]
        for start in range(0, len(data), chunk):
            sent = self.patch(upload_id, start, data[start : start + chunk])
            assert sent.status_code == 204, sent.text
        return self.finalize(upload_id, hashlib.sha256(data).hexdigest())


def issue_code(runtime: Runtime, institution_id: str, serial: str | None = None) -> str:
    code = runtime.devices.create_code(CLI, institution_id, serial).code
    logscan.plant(code)
    return code


def audit_events(runtime: Runtime, action: str) -> list[tuple[str, str, str | None, str | None, str]]:
    """(actor type, actor id, object type, object id, outcome) of every record of ``action``."""
    from sqlalchemy import select  # noqa: PLC0415  # only this helper reads tables

    from phivault.audit.models import AuditRecord  # noqa: PLC0415

    with runtime.db.transaction() as session:
        rows = session.execute(
            select(
                AuditRecord.actor_type,
                AuditRecord.actor_id,
                AuditRecord.object_type,
                AuditRecord.object_id,
                AuditRecord.outcome,
            )
            .where(AuditRecord.action == action)
            .order_by(AuditRecord.seq)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def all_audit_text(runtime: Runtime) -> str:
    """Every audit record's fields as one text, to search for secrets that must not be there."""
    from sqlalchemy import select  # noqa: PLC0415

    from phivault.audit.models import AuditRecord  # noqa: PLC0415

    with runtime.db.transaction() as session:
        return "\n".join(
            " ".join(str(value) for value in row)
            for row in session.execute(
                select(
                    AuditRecord.actor_id,
                    AuditRecord.object_type,
                    AuditRecord.object_id,
                    AuditRecord.user_agent,
                    AuditRecord.request_id,
                )
            )
        )


def activated_device(runtime: Runtime, institution_id: str) -> str:
    """A device row of ``institution_id``, as activation leaves it (for tests of admin routes)."""
    from phivault.devices.models import Device  # noqa: PLC0415
    from phivault.ids import new_id  # noqa: PLC0415

    key = DeviceKey()
    now = runtime.clock.now()
    device = Device(
        id=new_id(),
        institution_id=institution_id,
        serial=None,
        jkt=key.thumbprint,
        public_jwk=key.jwk,
        activated_at=now,
        last_seen_at=now,
        revoked_at=None,
    )
    with runtime.db.transaction() as session:
        session.add(device)
    return device.id
