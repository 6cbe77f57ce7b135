"""The device's key pair and the DPoP proofs it signs (RFC 9449 §4).

The private key is made here, stored 0600 in the agent's home, and never sent anywhere:
the server learns the public key from the ``jwk`` header of the activation proof.
Ed25519 (EdDSA) by default; P-256 (ES256) where a platform's key store wants it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from phivault.agent.files import write_private

ALGORITHMS: Final = ("EdDSA", "ES256")
DeviceKeyType = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class DeviceKey:
    def __init__(self, private: DeviceKeyType) -> None:
        self._private = private
        if isinstance(private, Ed25519PrivateKey):
            self.algorithm = "EdDSA"
        elif isinstance(private.curve, ec.SECP256R1):
            self.algorithm = "ES256"
        else:
            msg = "device keys are Ed25519 or P-256"
            raise TypeError(msg)
        jwk: dict[str, Any] = json.loads(
            jwt.algorithms.get_default_algorithms()[self.algorithm].to_jwk(private.public_key())
        )
        members = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("crv", "kty", "x")
        self.jwk = {name: jwk[name] for name in members}

    @classmethod
    def generate(cls, algorithm: str = "EdDSA") -> DeviceKey:
        if algorithm == "EdDSA":
            return cls(Ed25519PrivateKey.generate())
        if algorithm == "ES256":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        msg = f"unknown algorithm {algorithm!r}: use EdDSA or ES256"
        raise ValueError(msg)

    @classmethod
    def load(cls, path: Path) -> DeviceKey:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            msg = f"{path} holds neither an Ed25519 nor a P-256 key"
            raise TypeError(msg)
        return cls(private)

    def save(self, path: Path) -> None:
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(path, pem)

    @property
    def thumbprint(self) -> str:
        """RFC 7638 SHA-256 thumbprint (the server's ``jkt`` of this device)."""
        canonical = json.dumps(self.jwk, separators=(",", ":"), sort_keys=True)
        return b64url(hashlib.sha256(canonical.encode()).digest())

    def proof(self, method: str, url: str, *, token: str | None = None, nonce: str | None = None) -> str:
        """A fresh DPoP proof for one request: new ``jti``, now as ``iat``; ``ath`` binds it
        to ``token`` and ``nonce`` is the server's latest (RFC 9449 §4.2, §8).
        """
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(18),
            "htm": method.upper(),
            "htu": url.split("?", 1)[0].split("#", 1)[0],
            "iat": int(time.time()),
        }
        if token is not None:
            claims["ath"] = b64url(hashlib.sha256(token.encode("ascii")).digest())
        if nonce is not None:
            claims["nonce"] = nonce
        return jwt.encode(
            claims, self._private, algorithm=self.algorithm, headers={"typ": "dpop+jwt", "jwk": self.jwk}
        )
